"""Run-directory records: each round-trips through its file, and a file from another schema version
is refused with one line naming it instead of failing on a missing key."""

import json

import pytest
from click.testing import CliRunner

from hpc_mto import __version__
from hpc_mto.cli import main
from hpc_mto.errors import RunDirError
from hpc_mto.records import (Candidate, Choice, JobsRecord, JobSubmission, MetricsLine, ModelInfo, OutputScores,
                             RecordLog, Result, Selected, StalePeer, Timing, TransferDecision)


def a_result() -> Result:
    c = Candidate("task-0/final", 0, "final", True, 0.9, 0.3, 0.8, 0.7, 0.5, 0.85, 0.4, 0.05, [0, 1])
    single = OutputScores(c.id, [c.id], 0.8, 0.7, 0.5, 0.85, 0.4, 0.05)
    return Result(k=1, candidates=[c], cv_acc=[[0.9]], cv_loss=[[None]], rule="cv_mean",
                  choices={"cv_mean": Choice(0, c.id, 0.9, 0.8, 0.7, 0.85)},
                  selected=Selected(0, c.id, 0.9, 0.8, 0.7, 0.85, 0, "final"), outputs={"single": single},
                  output="single", estimate=0.7, estimate_samples=10, lineages_left=1, disagreement=None,
                  test_acc_mean=0.85, test_acc_best_single=0.85, timing=Timing([{"train": 1.0}], {"train": 1.0}))


def test_whole_file_records_read_back_equal(tmp_path):
    records = [a_result(), ModelInfo({"name": "mlp", "width": 8}, "task-0/best", [1, 8, 8], 10),
               JobsRecord("gang", {"partition": "gpu"}, {"time": 60}, ["12"], [JobSubmission(["12"], "2026-01-01T00:00:00")])]
    for i, record in enumerate(records):
        path = tmp_path / f"{i}.json"
        record.write(path)
        assert json.loads(path.read_text())["schema"] == type(record).SCHEMA
        assert type(record).read(path) == record


def test_log_records_read_back_equal_and_a_torn_last_line_is_skipped(tmp_path):
    lines = [MetricsLine(0, 1.0, 0.5, 0.9, 0.6, 1e-3, 0, [0], {"train": 0.1}),
             MetricsLine(1, 0.5, 0.8, 0.4, 0.9, 1e-3, 1, [1], {"train": 0.2}, adopted=True)]
    log = RecordLog(tmp_path / "m.jsonl", MetricsLine)
    for line in lines:
        log.append(line)
    with open(log.path, "a") as f:
        f.write('{"schema": 1, "epoch": 2, "train_lo')  # a writer killed mid-line
    assert log.read() == lines
    decisions = RecordLog(tmp_path / "t.jsonl", TransferDecision)
    decision = TransferDecision(1, 1, "best", 0, True, [1], [StalePeer(1, 2)], source=1, own_score=0.5,
                                scores=[0.5, None], gain=0.1)
    decisions.append(decision)
    assert decisions.read() == [decision]
    assert decision.adopted_from() == [1]


@pytest.mark.parametrize("schema, says", [(None, "no schema version (hpc-mto 0.1.x)"), (99, "schema 99")])
def test_a_record_of_another_schema_is_refused_naming_the_file_and_versions(tmp_path, schema, says):
    data = a_result().to_json()
    data.pop("schema") if schema is None else data.update(schema=schema)
    path = tmp_path / "result.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RunDirError) as err:
        Result.read(path)
    assert str(path) in str(err.value) and says in str(err.value) and f"schema {Result.SCHEMA}" in str(err.value)


def test_report_of_an_old_run_directory_is_one_line_not_a_key_error(best_k2, tmp_path):
    import shutil

    run_dir = tmp_path / "old"
    shutil.copytree(best_k2, run_dir, ignore=shutil.ignore_patterns("checkpoints", "report"))
    data = json.loads((run_dir / "result.json").read_text())
    del data["schema"]
    (run_dir / "result.json").write_text(json.dumps(data))
    res = CliRunner().invoke(main, ["report", str(run_dir)])
    assert res.exit_code == 2 and "KeyError" not in res.output
    assert res.stderr.strip().splitlines() == [
        f"hpc-mto: error: {run_dir / 'result.json'} was written with no schema version (hpc-mto 0.1.x); this "
        f"hpc-mto {__version__} reads Result schema 1: open it with the hpc-mto release that wrote it"]
