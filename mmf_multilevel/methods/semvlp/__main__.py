"""``python -m mmf_multilevel.methods.semvlp --counts``: SemVLP's parameters per mode at BERT-base size."""
import argparse
from typing import Dict, Iterable

import torch
from transformers import BertConfig

from mmf_multilevel.methods.semvlp.network import CROSS_LAYOUTS, SINGLE, TWO, SemVLPNetwork
from mmf_multilevel.modules.text import BertTextEncoder


def base_counts(cross_attention_layers: Iterable[str] = CROSS_LAYOUTS, cross_layer_start: int = 6) -> Dict[str, int]:
    """Parameter counts of the BERT-base network per mode, built on the meta device (no memory used)."""
    counts = {}
    for layout in cross_attention_layers:
        with torch.device("meta"):
            network = SemVLPNetwork(BertTextEncoder.from_config(BertConfig()), 2048, cross_layer_start, layout)
        counts[f"{layout}/single"] = network.num_parameters(SINGLE)
        counts[f"{layout}/two"] = network.num_parameters(TWO)
        counts[f"{layout}/stored"] = sum(p.numel() for p in network.parameters())
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description="SemVLP at BERT-base size: parameters used by each mode")
    parser.add_argument("--counts", action="store_true", help="print the parameter counts (default action)")
    parser.add_argument("--cross-layer-start", type=int, default=6, help="L_s (default 6)")
    args = parser.parse_args(argv)
    for key, value in base_counts(cross_layer_start=args.cross_layer_start).items():
        layout, what = key.split("/")
        print(f"cross_attention_layers={layout:5s} {what:6s}: {value:,}")


if __name__ == "__main__":
    main()

