"""experiments/common.py, the experiment driver, on a toy experiment (no training): the rows as
the record (a new machine skips the committed runs), the runs' workdirs, --only, a run claimed
by another process, setup and finish, --summarise_only; and every committed results file
regenerating from its rows with the command it names."""

import fcntl
import importlib
import json
import re

import pytest

from experiments import common
from experiments.common import plt

PROVENANCE = re.compile(r"^(Git revision: |Wall time: |This file was written by |Machine: )")


def _toy(calls: list[str], **kw) -> common.Experiment:
    def run(job, wd, ctx):
        calls.append(job.name)
        return {"score": job.seed + 0.5}

    def summarise(rows, ctx):
        _, runs = common.split(rows)
        table = [[r["name"], common.cell(r, "score"), r.get("final", "")] for r in runs]
        return f"# toy\n\n{ctx.header}\n" + common.markdown_table(["run", "score", "f"], table)

    return common.Experiment(
        module="tests.toy",
        doc="a toy",
        workdir="unused",
        name=lambda a: "toy",
        plan=lambda ctx: [common.Job(f"r{s}", "m", seed=s) for s in range(ctx.args.seeds)],
        run=run,
        summarise=summarise,
        **kw,
    )


def _body(md: str) -> list[str]:
    """A results file without the lines that name its invocation (revision, time, machine)."""
    return [line for line in md.splitlines() if not PROVENANCE.match(line)]


def test_the_rows_are_the_record(tmp_path):
    calls = []
    exp = _toy(calls)
    out = tmp_path / "results"
    main = lambda wd, *argv: common.main(exp, ["--workdir", str(tmp_path / wd), *argv])
    rows = main("w1", "--seeds", "2", "--out", str(out))
    assert calls == ["r0", "r1"] and [r["name"] for r in rows] == ["r0", "r1"]
    assert rows[1]["score"] == 1.5 and rows[1]["seed"] == 1 and rows[1]["wall_s"] >= 0
    assert json.loads((out / "toy.json").read_text()) == rows
    assert "Runs: 2 of the 2 planned finished." in (out / "toy.md").read_text()
    main("w2", "--seeds", "2", "--out", str(out))  # a new machine: an empty workdir
    assert calls == ["r0", "r1"]  # the rows' runs are skipped
    (out / "toy.json").unlink()  # the rows lost, the runs' workdirs kept: rows from the workdirs
    again = main("w1", "--seeds", "3", "--out", str(out))
    assert calls == ["r0", "r1", "r2"] and again[:2] == rows and again[2]["score"] == 2.5
    main("w3", "--seeds", "1")  # default --out: the workdir's results (the checkout stays clean)
    assert calls[-1] == "r0" and (tmp_path / "w3" / "results" / "toy.md").exists()


def test_only_and_a_run_another_process_holds(tmp_path):
    calls = []
    exp = _toy(calls)
    main = lambda *argv: common.main(exp, ["--workdir", str(tmp_path), "--seeds", "3", *argv])
    main("--only", "r1")
    assert calls == ["r1"]
    with pytest.raises(SystemExit, match="names no planned run"):
        main("--only", "r7")
    (tmp_path / "runs").mkdir(exist_ok=True)
    with open(tmp_path / "runs" / ".r0.lock", "a") as held:  # another process trains r0
        fcntl.flock(held, fcntl.LOCK_EX)
        main()
    assert calls == ["r1", "r2"]  # r0 left to the process that holds it
    main()
    assert calls == ["r1", "r2", "r0"]
    rows = json.loads((tmp_path / "results" / "toy.json").read_text())
    assert [r["name"] for r in rows] == ["r1", "r2", "r0"]


def test_setup_rows_and_finish_once_every_run_has_its_row(tmp_path):
    calls, finished = [], []

    def finish(rows, ctx):
        finished.append(len(rows))
        return [{**r, "final": "yes"} for r in rows if r["name"] != common.BASE]

    exp = _toy(calls, setup=lambda ctx: [{"name": common.BASE, "wall_s": 600.0}], finish=finish)
    main = lambda *argv: common.main(exp, ["--workdir", str(tmp_path), "--seeds", "2", *argv])
    main("--only", "r0")
    assert finished == []  # r1 has no row yet
    rows = main()
    assert finished == [3] and [r.get("final") for r in rows] == [None, "yes", "yes"]
    md = (tmp_path / "results" / "toy.md").read_text()
    assert "| r0 | 0.5 | yes |" in md and "10.0 min of training" in md  # the setup's time in
    pub = tmp_path / "published"  # a sweep run with the default --out, then published
    rows = main("--summarise_only", "--out", str(pub))
    assert finished == [3] and calls == ["r0", "r1"]  # no training, no finish
    assert {r["name"] for r in rows} == {common.BASE, "r0", "r1"} and rows[-1]["final"] == "yes"
    assert "10.0 min of training" in (pub / "toy.md").read_text()


def test_summarise_only_rewrites_the_same_file_from_the_rows(tmp_path, monkeypatch):
    calls = []
    exp = _toy(calls)
    first = ["--workdir", str(tmp_path / "w"), "--seeds", "2"]
    monkeypatch.setattr("sys.argv", ["toy", *first])  # the command the file names
    common.main(exp, first)
    written, committed = tmp_path / "w" / "results", tmp_path / "committed"
    committed.mkdir()
    (committed / "toy.json").write_bytes((written / "toy.json").read_bytes())
    argv = ["--seeds", "2", "--summarise_only", "--workdir", str(tmp_path / "new")]
    argv += ["--out", str(committed)]
    monkeypatch.setattr("sys.argv", ["toy", *argv])
    common.main(exp, argv)
    assert calls == ["r0", "r1"]  # nothing trained
    assert _body((committed / "toy.md").read_text()) == _body((written / "toy.md").read_text())
    assert "This file was written by" in (committed / "toy.md").read_text()
    with pytest.raises(SystemExit, match="no finished runs"):
        common.main(exp, ["--summarise_only", "--workdir", str(tmp_path / "new")])


def test_every_committed_results_file_regenerates_from_its_rows(tmp_path, monkeypatch):
    """Each results file's own command (its Command line), with --summarise_only on an empty
    workdir, writes the same file from its committed rows: the .md apart from the lines naming
    the invocation, the .json byte for byte, and the plots the .md shows. (The plots are built
    but not rasterised here, for time: their bytes were compared when the driver came in.)"""
    plots = []
    monkeypatch.setattr(common, "save", lambda fig, path: (plots.append(path.name), plt.close(fig)))
    files = sorted(common.RESULTS.glob("*.md"))
    assert len(files) >= 16
    for md in files:
        text = md.read_text()
        module, flags = re.search(r"^Command: `python -m (\S+)(.*?)`", text, re.M).groups()
        exp = importlib.import_module(module).EXPERIMENT
        out = tmp_path / md.stem
        out.mkdir()
        (out / f"{md.stem}.json").write_bytes(md.with_suffix(".json").read_bytes())
        argv = [*flags.split(), "--summarise_only", "--workdir", str(tmp_path / "w")]
        argv += ["--out", str(out)]
        monkeypatch.setattr("sys.argv", [module, *argv])
        plots.clear()
        common.main(exp, argv)
        assert (out / md.name).exists(), md.name  # the command names this file
        assert _body((out / md.name).read_text()) == _body(text), md.name
        assert (out / f"{md.stem}.json").read_bytes() == md.with_suffix(".json").read_bytes()
        shown = re.findall(r"\]\(([a-z0-9_]+\.png)\)", text)
        assert sorted(set(plots)) == sorted(shown), md.name
        assert all((common.RESULTS / png).exists() for png in shown)
