"""python -m reports EXPERIMENT [--tracking-uri URI] [--out DIR] [--reference CSV]"""
import argparse
import os
import sys

from nvae_platform.defaults import default_tracking_uri

from .build import build_report
from .runs import ReportError


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m reports", description=(
        "The paper's table of a study from its MLflow runs: Markdown, CSV, LaTeX, plots and one HTML page."))
    parser.add_argument("experiment", help="MLflow experiment of the study, e.g. ablation_norm")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///<working dir>/mlflow.db)")
    parser.add_argument("--out", default="reports-out", help="folder of the report files (default: reports-out)")
    parser.add_argument("--reference", help="CSV of the paper's values (default: reports/paper_reference.csv)")
    args = parser.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        parser.error(f"no MLflow store at {uri}: run a study here first, or pass --tracking-uri")
    try:
        paths = build_report(args.experiment, uri, args.out, args.reference)
    except (ReportError, ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    for path in paths:
        if path.endswith("table.md"):
            print(f"\n{path}\n")
            with open(path) as f:
                print(f.read())
    print(f"{len(paths)} files under {os.path.join(args.out, args.experiment)}; open report.html in a browser")
    return 0


if __name__ == "__main__":
    sys.exit(main())
