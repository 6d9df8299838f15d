import sys

from mmf_multilevel.predict.cli import main

sys.exit(main())
