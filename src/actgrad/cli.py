"""``actgrad``: small commands beside the workflow (the workflow itself is ``snakemake``)."""

from __future__ import annotations

import argparse
import sys


def _validate(args) -> int:
    from .config import ConfigError, load, variant_spec

    try:
        config = load(args.configfile)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name in config["variants"]:
        spec = variant_spec(config, name)
        print(f"{name}: {spec['model']}, batchnorm={spec['batchnorm']}, {spec['max_steps']} steps, "
              f"seeds {spec['seeds']}")
    print(f"{args.configfile}: valid")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="actgrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("validate", help="check a config file against the schema and list its variants")
    check.add_argument("configfile", nargs="?", default="config/config.yaml")
    sub.add_parser("bench", help="benchmark the training engines (see `actgrad bench --help`)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from .bench import main as bench_main

        return bench_main(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _validate(args)


if __name__ == "__main__":
    sys.exit(main())
