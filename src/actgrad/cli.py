"""The actgrad command: small tools beside the workflow (the workflow itself runs with snakemake).

Its help texts are printed as written (RawDescriptionHelpFormatter), so they are plain text.
"""

from __future__ import annotations

import argparse
import os
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


def _diagnose(args) -> int:
    from pathlib import Path

    import pandas as pd
    import yaml

    from actgrad.results.diagnosis import COLUMNS, SEVERITIES, fix_study
    from actgrad.results.summary import TABLES
    from actgrad.study.load import load, read_yaml, resolve_base
    from actgrad.study.settings import ConfigError
    from actgrad.study.sweeps import expand_sweeps

    path = Path(args.results) / TABLES["diagnosis"]
    if not path.exists():
        print(f"error: {path} is missing: run the workflow first (snakemake ... results/diagnosis.csv writes it)",
              file=sys.stderr)
        return 1
    findings = pd.read_csv(path, keep_default_na=False) if path.read_text().strip() else pd.DataFrame(columns=COLUMNS)
    if findings.empty:
        print(f"{path}: no findings - every variant passed every check")
    counts = {s: int((findings.severity == s).sum()) for s in SEVERITIES}
    for variant in dict.fromkeys(findings.variant):
        print(variant)
        for _, f in findings[findings.variant == variant].iterrows():
            print(f"  {f.severity.upper():8s} {f.code}: {f.sentence}")
            if f.prescription and f.prescription != "{}":
                print(f"           prescription: {f.prescription}")
    if not findings.empty:
        print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" finding(s) in {findings.variant.nunique()} "
              f"variant(s); thresholds and their sources: docs/diagnosis.md")
    if not args.write_fixes:
        return 0
    try:
        written = resolve_base(read_yaml(args.study), Path(args.study).parent)
        completed = load(args.study)
        unknown = sorted(set(findings.variant) - set(completed["variants"]))
        if unknown:
            raise ConfigError(f"{args.study} has no variant(s) {', '.join(unknown)}: is it the study that wrote "
                              f"{args.results}? (give it with --study)")
        out = Path(args.write_fixes)
        base = os.path.relpath(Path(args.study).resolve(), out.resolve().parent)
        study = fix_study(expand_sweeps(written), completed, findings, base, include_warnings=not args.severe_only)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Written by actgrad diagnose --write-fixes: each flagged variant with its prescription, as\n"
                   "# <variant>__fixed, and a comparison family 'prescriptions' pairing each with its original.\n"
                   f"#   snakemake --cores 4 --configfile {out}\n" + yaml.safe_dump(study, sort_keys=False))
    load(out)  # what was written validates
    print(f"{out}: {len(study['variants'])} prescription(s) to try: {', '.join(study['variants'])}")
    print(f"run them: snakemake --cores 4 --configfile {out}  (the same --directory reuses the trained runs)")
    return 0


DESCRIPTION = """\
Small tools beside the workflow. The pipeline itself runs with snakemake:
  snakemake --cores 4                        runs the default study and writes report/report.html"""

EXAMPLES = """\
examples:
  actgrad validate config/smoke.yaml         check a study's config before running it
  actgrad diagnose results                   what is wrong with each network, and what to change
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


DIAGNOSE_DESCRIPTION = """\
Print the findings of the summary step (RESULTS/diagnosis.csv): per variant, each finding's severity
(severe, warning, info), what was measured against which threshold, and the prescription - a change
to the variant's config. With --write-fixes, write a study that trains each flagged variant again with
its prescription applied (<variant>__fixed) beside the study it came from, and compares each pair
with the significance table's tests; its report shows each pair before and after.
docs/diagnosis.md lists the checks, their thresholds and where each number comes from."""

DIAGNOSE_EXAMPLE = """\
example:
  actgrad diagnose results --write-fixes config/fixes.yaml --study config/smoke.yaml
  snakemake --cores 4 --configfile config/fixes.yaml"""


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
    diagnose = sub.add_parser("diagnose", help="print the diagnosis of each variant (results/diagnosis.csv)",
                              description=DIAGNOSE_DESCRIPTION, epilog=DIAGNOSE_EXAMPLE, formatter_class=raw)
    diagnose.add_argument("results", metavar="RESULTS", help="the workflow's results folder")
    diagnose.add_argument("--write-fixes", metavar="FILE.yaml",
                          help="write a study with each flagged variant's prescription applied, as <variant>__fixed")
    diagnose.add_argument("--study", default="config/config.yaml", metavar="CONFIG",
                          help="the config of the study that wrote RESULTS (default: config/config.yaml); "
                               "the written study starts from it (base:)")
    diagnose.add_argument("--severe-only", action="store_true",
                          help="with --write-fixes: prescribe only for severe findings")
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
    if args.command == "diagnose":
        return _diagnose(args)
    return _validate(args)


if __name__ == "__main__":
    sys.exit(main())
