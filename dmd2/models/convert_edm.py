"""Convert an EDM network pickle to safetensors, safely (no code from the file runs).

    python -m dmd2.models.convert_edm IN.pkl OUT.safetensors [--key ema] [--no-verify]

Writes the tensors of network ``--key`` (default ``ema``) with EDM's names (``model.map_layer0.weight``, ...) and
metadata (class names, ``sigma_data``, constructor kwargs as JSON). When the network is EDM's ADM (``DhariwalUNet``)
the result is checked against :class:`dmd2.models.adm.ADMNet` built from the recorded kwargs (names and shapes).
Exit status 2 when the file is refused (a global outside the allow-list, a storage that would expand beyond the
bytes it occupies, constructor kwargs outside :data:`~dmd2.models.edm_pickle.EDM_KWARG_RANGES`) or does not match.
"""
from __future__ import annotations

import argparse
import json
import sys

from .edm_pickle import adm_config_from_edm_kwargs, check_state_dict_matches, convert_edm_pickle


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dmd2.models.convert_edm", description=__doc__.split("\n\n")[0])
    ap.add_argument("input", help="EDM .pkl (e.g. edm-imagenet-64x64-cond-adm.pkl)")
    ap.add_argument("output", help="output .safetensors path")
    ap.add_argument("--key", default="ema", help="entry of the pickled dict to convert (default: ema)")
    ap.add_argument("--no-verify", action="store_true", help="skip the check against our ADM network")
    args = ap.parse_args(argv)
    try:
        meta = convert_edm_pickle(args.input, args.output, key=args.key)
    except (ValueError, FileNotFoundError) as e:  # EDMPickleRefused is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    from safetensors.torch import load_file

    sd = load_file(args.output)
    n = sum(t.numel() for t in sd.values())
    print(f"wrote {args.output}: {len(sd)} tensors, {n:,} elements, class {meta.get('class_name')}"
          f"({meta.get('model_class_name', '-')})")
    if not args.no_verify and meta.get("model_class_name") == "DhariwalUNet" and "model_init_kwargs" in meta:
        from .adm import EDM_IMAGENET64_SIGMA_DATA, build_edm_adm

        config = adm_config_from_edm_kwargs(json.loads(meta["model_init_kwargs"]))
        net = build_edm_adm(config, float(meta.get("sigma_data", EDM_IMAGENET64_SIGMA_DATA)), device="meta")
        try:
            check_state_dict_matches(net, sd)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"verified against ADMNet({config})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
