"""``python -m mmf_multilevel.extraction ...``: the same command line as feature_extraction/extract.py."""
from mmf_multilevel.extraction.cli import run

run()
