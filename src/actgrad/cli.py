"""``actgrad``: small commands beside the workflow (the workflow itself is ``snakemake``)."""

from __future__ import annotations

import argparse
import sys


def _validate(args) -> int:
    from pathlib import Path

    from .config import ConfigError, apply_defaults, load_schema, read_yaml, resolve_base, validate, variant_spec
    from .sweeps import expand_sweeps, format_value, sweep_groups

    try:
        # config.load's steps, with the sweeps expanded before the check (idempotent, so this stays
        # right once load expands them itself).
        config = expand_sweeps(resolve_base(read_yaml(args.configfile), Path(args.configfile).parent))
        schema = load_schema()
        validate(config, schema)
        apply_defaults(config, schema)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    runs = twins = 0
    for sweep, names in sweep_groups(config).items():
        sweep_keys = list(config["sweeps"][sweep]["grid"]) if sweep else []
        print(f"sweep {sweep} ({len(names)} points over {' x '.join(sweep_keys)}):" if sweep
              else f"variants ({len(names)}):")
        for name in names:
            spec = variant_spec(config, name)
            runs += len(spec["seeds"])
            twins += len(spec["seeds"]) if spec["sensitivity_twin"] else 0
            point = config["variants"][name].get("sweep", {}).get("point", {})
            settings = ", ".join(f"{key}={format_value(value)}" for key, value in
                                 {"batchnorm": spec["batchnorm"], **point}.items())
            print(f"  {name}: {spec['model']}, {settings}, {spec['max_steps']} steps, "
                  f"seeds {spec['seeds']}{', with twins' if spec['sensitivity_twin'] else ''}")
    counted = f"{runs + twins} runs ({runs} + {twins} sensitivity twins)" if twins else f"{runs} runs"
    print(f"{args.configfile}: valid; {len(config['variants'])} variants, {counted}")
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
