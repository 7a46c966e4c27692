"""Scale-out tuning: workers sharing one Optuna study share one MLflow parent run.

The two-worker test runs against a throwaway PostgreSQL cluster (Debian's binaries under
/usr/lib/postgresql/*/bin; PostgreSQL refuses root, so as root they run as the ``postgres`` account) holding the
Optuna study and the backend store of a real ``mlflow server``; without PostgreSQL it skips with the reason. The
resume, replace and claim rules of the parent run are the same on any storage and run on the tests' SQLite stores.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import mlflow
import optuna
import pandas as pd
import psycopg2
import pytest
from typer.testing import CliRunner

from personalize.cli import app
from personalize.errors import PersonalizeError
from training.tracking import PARENT_RUN_ATTR, tracked_tune
from training.tune import TuneConfig, ranked_trials, split_labeled_table

PG_BINARIES = Path("/usr/lib/postgresql")
QUICK = TuneConfig(families=("lightgbm",), trials=2, max_rounds=100, early_stopping_rounds=10, cv_folds=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster on 127.0.0.1 (trust auth, socket in its temp dir) with databases ``optuna`` and
    ``mlflow``; yields the server's SQLAlchemy URL without a database."""
    initdbs = sorted(PG_BINARIES.glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if not initdbs:
        pytest.skip(f"PostgreSQL is not installed: no {PG_BINARIES}/*/bin/initdb (Debian package `postgresql`)")
    bin_dir, as_user = initdbs[-1].parent, []
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` account to run PostgreSQL as (it refuses to run as root)")
        if not shutil.which("runuser"):
            pytest.skip("running as root without `runuser` to start PostgreSQL as `postgres`")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="personalize-pg-"))  # under /tmp: pytest's tmp dirs are root-only
    data, port = root / "data", free_port()
    if as_user:
        os.chown(root, account.pw_uid, account.pw_gid)

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], cwd=root, capture_output=True, text=True, timeout=120)

    try:
        done = pg(str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync")
        if done.returncode:
            pytest.skip(f"PostgreSQL initdb failed ({bin_dir}): {tail(done.stderr)}")
        done = pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                  "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off", "start")
        if done.returncode:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            pytest.skip(f"PostgreSQL did not start ({bin_dir}): {tail(done.stderr + done.stdout + log)}")
        try:
            connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute("CREATE DATABASE optuna")
                cursor.execute("CREATE DATABASE mlflow")
            connection.close()
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
        finally:
            pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on the ``mlflow`` database, artifacts proxied to a temp dir; yields its URL."""
    root, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"{postgres}/mlflow",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job-runner processes
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # imports and migrations; slow on a busy machine
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited with {server.returncode}:\n{tail((root / 'server.log').read_text())}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 240 s:\n{tail((root / 'server.log').read_text())}")
            time.sleep(0.5)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


@pytest.fixture
def telco(tmp_path: Path, data_root: Path) -> str:
    """The first 400 Telco customers, ingested under this test's home as data set ``telco``."""
    source = next((data_root / "telco_churn").glob("*.csv"))
    pd.read_csv(source, nrows=400).to_csv(tmp_path / "telco.csv", index=False)
    (tmp_path / "telco.yaml").write_text(
        "dataset: telco\nlabeled: {path: telco.csv, label_column: Churn, positive: 'Yes', id_column: customerID}\n")
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "telco.yaml")])
    assert result.exit_code == 0, result.output
    return "telco"


@pytest.fixture
def restore_tracking_uri() -> Iterator[None]:
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


@pytest.fixture(scope="module")
def sqlite_tracking(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite MLflow store for the in-process tests (creating one costs seconds); each uses its experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"


@pytest.mark.slow
def test_two_workers_share_one_study_and_one_parent_run(postgres: str, mlflow_server: str, telco: str,
                                                        isolated_home: Path, tmp_path: Path,
                                                        restore_tracking_uri: None) -> None:
    # Given: the data set on two workers' own homes, one study in PostgreSQL, one MLflow server on PostgreSQL
    shutil.copytree(isolated_home, tmp_path / "home2")
    storage, study_name = f"{postgres}/optuna", "telco-scale-out"
    command = [sys.executable, "-m", "personalize", "tune", telco, "--study", study_name, "--trials", "3",
               "--family", "lightgbm"]
    outputs = [tmp_path / f"worker{i}.log" for i in (1, 2)]
    # When: two workers tune it at once
    workers = [subprocess.Popen(command, stdout=out.open("w"), stderr=subprocess.STDOUT, env={
        **os.environ, "PERSONALIZE_HOME": str(home), "PERSONALIZE_OPTUNA_STORAGE": storage,
        "MLFLOW_TRACKING_URI": mlflow_server}) for home, out in zip((isolated_home, tmp_path / "home2"), outputs)]
    try:
        codes = [w.wait(timeout=300) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    logs = [out.read_text() for out in outputs]
    assert codes == [0, 0], "\n\n".join(tail(text, 30) for text in logs)

    # Then: six finished trials from both workers in the one study
    study = optuna.load_study(study_name=study_name, storage=storage)
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(study.trials) == len(finished) == 6
    workers_seen = {t.user_attrs["worker"] for t in finished}
    assert len(workers_seen) == 2
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 6  # each worker samples with its own seed
    # and one parent run in the MLflow server, the one every worker printed, with the baseline and every trial
    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(f"tune-{telco}")
    parents = client.search_runs([experiment.experiment_id], "tags.kind = 'tuning'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == study.user_attrs[PARENT_RUN_ATTR]
    assert all(f"MLflow parent run {parent.info.run_id}" in text for text in logs)
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trial_runs = [c for c in children if c.data.tags["kind"] == "trial"]
    assert sorted(c.data.tags["kind"] for c in children) == ["baseline"] + ["trial"] * 6
    assert sorted(c.info.run_name for c in trial_runs) == sorted(f"trial-{t.number}" for t in finished)
    assert {c.data.tags["worker"] for c in trial_runs} == workers_seen
    # whose chosen trial is the study's, whoever finished last
    chosen = ranked_trials(study)[0]
    assert parent.data.tags["best_trial"] == str(chosen.number)
    assert parent.data.metrics["best_cv_roc_auc"] == chosen.value
    assert client.list_artifacts(parent.info.run_id)[0].path == "best_params.json"
    # and the runs really are in PostgreSQL
    with psycopg2.connect(postgres.replace("postgresql+psycopg2", "postgresql") + "/mlflow") as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT run_uuid FROM runs WHERE experiment_id = %s", (int(experiment.experiment_id),))
            stored = {row[0] for row in cursor.fetchall()}
    assert stored == {parent.info.run_id, *(c.info.run_id for c in children)}


def test_workers_opening_an_empty_mlflow_database_at_once_all_start(postgres: str) -> None:
    # Given a fresh, empty database for MLflow's store
    connection = psycopg2.connect(postgres.replace("postgresql+psycopg2", "postgresql") + "/postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("CREATE DATABASE mlflow_fresh")
    connection.close()
    # When three workers connect to it at the same moment (each would create MLflow's tables)
    probe = "from training.registry import connect; connect(__import__('sys').argv[1]); print('connected')"
    workers = [subprocess.Popen([sys.executable, "-c", probe, f"{postgres}/mlflow_fresh"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[1])
               for _ in range(3)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    # Then every one starts (one created the tables under the lock, the others found them)
    assert [w.returncode for w in workers] == [0, 0, 0], "\n\n".join(tail(o, 20) for o in outputs)
    assert mlflow.MlflowClient(f"{postgres}/mlflow_fresh").search_experiments()[0].name == "Default"


@pytest.mark.slow
def test_a_model_trained_through_a_tracking_server_is_registered_promoted_and_audited_there(
        mlflow_server: str, telco: str, monkeypatch: pytest.MonkeyPatch, restore_tracking_uri: None) -> None:
    # Given: the platform pointed at a shared MLflow server (PostgreSQL behind it), as the README's set-up says
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    runner = CliRunner()
    # When: a model is trained, then promoted there
    trained = runner.invoke(app, ["train", "churn", telco, "--trials", "1", "--family", "lightgbm",
                                  "--name", "churn_remote"])
    assert trained.exit_code == 0, trained.output
    promoted = runner.invoke(app, ["promote", "churn_remote", "--reason", "first version"])
    assert promoted.exit_code == 0, promoted.output
    # Then: the server's registry holds version 1 as champion, its source the logged model, with the audit trail
    client = mlflow.MlflowClient(mlflow_server)
    champion = client.get_model_version_by_alias("churn_remote", "champion")
    assert champion.version == "1" and champion.source.startswith("models:/m-")
    history = runner.invoke(app, ["history", "churn_remote"])
    assert history.exit_code == 0 and "register" in history.output and "promote" in history.output, history.output


def test_tuning_a_study_again_resumes_its_parent_run_or_replaces_a_deleted_one(
        telco: str, isolated_home: Path, tmp_path: Path, sqlite_tracking: str, restore_tracking_uri: None) -> None:
    # Given: a study tuned once
    split = split_labeled_table(isolated_home / "data" / telco, 0.2, 42)
    storage, uri = os.environ["PERSONALIZE_OPTUNA_STORAGE"], sqlite_tracking
    artifacts = (tmp_path / "artifacts").as_uri()
    first, parent_id = tracked_tune(split, QUICK, storage, "again", uri, "tune-again", artifacts)
    client = mlflow.MlflowClient(uri)

    def children(run_id: str) -> list[str]:
        runs = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        return sorted(r.data.tags["kind"] for r in runs)

    # When: it is tuned again, later, with another budget
    more = QUICK.model_copy(update={"trials": 3})
    second, resumed_id = tracked_tune(split, more, storage, "again", uri, "tune-again", artifacts)
    # Then: the trials join the same parent run, whose configuration and baseline were logged once
    assert resumed_id == parent_id and len(second.study.trials) == 5
    assert children(parent_id) == ["baseline"] + ["trial"] * 5
    assert client.get_run(parent_id).data.params["trials"] == "2"
    # When: the parent run is deleted and the study tuned again
    client.delete_run(parent_id)
    third, new_id = tracked_tune(split, QUICK, storage, "again", uri, "tune-again", artifacts)
    # Then: a new parent run, with its own baseline and this session's trials, is recorded on the study
    assert new_id != parent_id and third.study.user_attrs[PARENT_RUN_ATTR] == new_id
    assert children(new_id) == ["baseline"] + ["trial"] * 2
    assert client.get_run(new_id).data.tags["best_trial"] == str(ranked_trials(third.study)[0].number)


def test_a_worker_with_another_split_is_refused_before_it_touches_the_parent_run(
        telco: str, isolated_home: Path, sqlite_tracking: str, restore_tracking_uri: None) -> None:
    # Given a study tuned on one split, its parent run finished
    storage, uri = os.environ["PERSONALIZE_OPTUNA_STORAGE"], sqlite_tracking
    split, other = (split_labeled_table(isolated_home / "data" / telco, 0.2, seed) for seed in (42, 7))
    _, parent_id = tracked_tune(split, QUICK, storage, "claimed", uri, "tune-claimed")
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    runs = len(client.search_runs([experiment_id]))
    # When a worker with another split joins it by name, Then it is refused, and the parent run and its children
    # are as they were (not FAILED by the refusal, no baseline of its own)
    with pytest.raises(PersonalizeError, match="'claimed' holds trials scored on other rows"):
        tracked_tune(other, QUICK, storage, "claimed", uri, "tune-claimed")
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert len(client.search_runs([experiment_id])) == runs


def test_a_study_tuned_before_parents_were_recorded_gets_one_and_a_dead_claim_is_a_clear_error(
        telco: str, isolated_home: Path, sqlite_tracking: str, restore_tracking_uri: None) -> None:
    from training.tune import tune

    split = split_labeled_table(isolated_home / "data" / telco, 0.2, 42)
    storage, uri = os.environ["PERSONALIZE_OPTUNA_STORAGE"], sqlite_tracking
    # Given: a study without a recorded parent run (tuned without tracking)
    tune(split, QUICK, storage, "untracked")
    # When / then: tracking it records a new parent run at once (its trials have run: no creator to wait for)
    started = time.monotonic()
    result, parent_id = tracked_tune(split, QUICK, storage, "untracked", uri, "tune-untracked", join_wait_s=30)
    assert time.monotonic() - started < 30 and result.study.user_attrs[PARENT_RUN_ATTR] == parent_id
    # Given: another study whose replacement parent was claimed by a worker that died before recording it
    tune(split, QUICK, storage, "orphan")
    optuna.create_study(storage=storage, study_name="orphan:mlflow-parent-replacing:none")
    # When / then: a worker waits, bounded, then says what to do
    with pytest.raises(PersonalizeError, match="delete its claim .*orphan:mlflow-parent-replacing:none"):
        tracked_tune(split, QUICK, storage, "orphan", uri, "tune-untracked", join_wait_s=0.5)


def test_a_command_launched_by_mlflow_projects_tunes_into_the_run_it_was_given(
        telco: str, isolated_home: Path, sqlite_tracking: str, restore_tracking_uri: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from training.tracking import use_experiment

    # Given: `mlflow run` started a run for the entry point and passes it down (MLFLOW_RUN_ID)
    split = split_labeled_table(isolated_home / "data" / telco, 0.2, 42)
    launched = mlflow.MlflowClient(sqlite_tracking).create_run(use_experiment(sqlite_tracking, "tune-launched"))
    monkeypatch.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    # When: the tune command runs
    result, run_id = tracked_tune(split, QUICK, os.environ["PERSONALIZE_OPTUNA_STORAGE"], "launched",
                                  sqlite_tracking, "tune-launched")
    # Then: the study is logged into that run, which is not recorded as the study's own parent
    assert run_id == launched.info.run_id and PARENT_RUN_ATTR not in result.study.user_attrs
