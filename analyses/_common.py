"""Shared argument handling for the analysis scripts: a two-stage / mixed checkpoint pair and an output folder."""

import argparse


def pair_parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--two-stage", default="default-s0-two-stage", help="registry name or folder")
    ap.add_argument("--mixed", default="default-s0-mixed", help="registry name or folder")
    ap.add_argument("--registry", default=None, help="checkpoints.yaml (default: the project's)")
    ap.add_argument("--out", required=True, help="output folder")
    return ap
