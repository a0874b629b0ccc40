"""The actgrad command: small tools beside the workflow (the workflow itself runs with snakemake).

Its help texts are printed as written (RawDescriptionHelpFormatter), so they are plain text.
"""

from __future__ import annotations

import argparse
import sys


def _validate(args) -> int:
    from actgrad.study.load import load
    from actgrad.study.settings import ConfigError, variant_spec
    from actgrad.study.sweeps import format_value, sweep_groups

    try:
        config = load(args.configfile)
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


DESCRIPTION = """\
Small tools beside the workflow. The pipeline itself runs with snakemake:
  snakemake --cores 4                        runs the default study and writes report/report.html"""

EXAMPLES = """\
examples:
  actgrad validate config/smoke.yaml         check a study's config before running it
  actgrad export-tensorboard results tb      then: tensorboard --logdir tb
  actgrad bench --quick                      a short benchmark of the training engines

Each command has its own help: actgrad COMMAND --help"""

VALIDATE_EXAMPLE = """\
example:
  actgrad validate config/smoke.yaml
An invalid file prints 'invalid config:' and one line per problem ('key: what is wrong'),
and the exit status is 1."""

EXPORT_DESCRIPTION = """\
Write every run's statistics, histograms and minibatch losses as TensorBoard events,
one TensorBoard run per variant and seed: LOGDIR/<variant>/seed<seed>.
  scalars     <kind>/<layer>/<stat>, from runs/<variant>/seed<seed>/stats.parquet
  histograms  <kind>/<layer>, from histograms.parquet (the recorded bins, fractions)
  losses      loss/minibatch (and loss/twin), from losses.parquet
Exporting again replaces those run folders. Needs the optional tensorboard package:
  pip install -e ".[tensorboard]"
"""

EXPORT_EXAMPLE = """\
example:
  actgrad export-tensorboard results runs/actgrad && tensorboard --logdir runs"""


def _export_tensorboard(args) -> int:
    from actgrad.tools.tensorboard import ExportError, export

    def progress(run, target, counts):
        print(f"{run.variant}/seed{run.seed}: {counts['scalars']} scalars, {counts['histograms']} histograms, "
              f"{counts['losses']} losses -> {target}")

    try:
        runs = export(args.results, args.logdir, loss_every=args.loss_every, progress=progress)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(runs)} runs written; view them with: tensorboard --logdir {args.logdir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="actgrad", description=DESCRIPTION, epilog=EXAMPLES, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = sub.add_parser("validate", help="check a config file against the schema and list its variants",
                           description="Check a config file against the schema and list its variants and runs.",
                           epilog=VALIDATE_EXAMPLE, formatter_class=raw)
    check.add_argument("configfile", nargs="?", default="config/config.yaml",
                       help="the config to check (default: config/config.yaml)")
    export = sub.add_parser("export-tensorboard", help="write the results as TensorBoard event files",
                            description=EXPORT_DESCRIPTION, epilog=EXPORT_EXAMPLE, formatter_class=raw)
    export.add_argument("results", metavar="RESULTS", help="the workflow's results folder (holding runs/)")
    export.add_argument("logdir", metavar="LOGDIR", help="where to write the TensorBoard runs")
    export.add_argument("--loss-every", type=int, default=100, metavar="N",
                        help="write the minibatch loss of every N-th step (default 100; 1 for every step)")
    # bench parses its own options (actgrad bench --help prints them).
    sub.add_parser("bench", help="benchmark the training engines against the lecture's loop", add_help=False)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from actgrad.tools.bench import main as bench_main

        return bench_main(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "export-tensorboard":
        return _export_tensorboard(args)
    return _validate(args)


if __name__ == "__main__":
    sys.exit(main())
