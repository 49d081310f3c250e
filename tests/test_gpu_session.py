"""bench/gpu_session.sh, the script a lent GPU machine runs: it parses, lists its steps and
phases, refuses bad arguments naming them, and a CPU dry run of its two cheapest steps writes
the summary and the results archive, and a signal stops the running step (the full dry run,
every step, is in docs/DEVELOPING.md); its check (--check) passes the GPU run's command lines of
a few steps and fails a step whose command line was broken."""
import csv
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_session.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _run(*args, env=None, timeout=120):
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=full,
                          timeout=timeout, cwd=ROOT)


def test_script_parses():
    res = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def _steps():
    res = _run("--list")
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()[1:] if line.strip()]
    return {name: (phase, int(cap)) for name, phase, cap in rows}


def test_list_names_every_step_with_its_phase_and_cap():
    steps = _steps()
    # the build, the GPU tests and the op benchmarks come first; each model's short training
    # run, its animation and the full-resolution fps of the models with a GPU goal after
    assert [s for s, (p, _) in steps.items() if p == "phase1"] == [
        "env", "build", "info", "gpu_tests", "bench_ops"]
    for model in ("eg3d", "goha", "mmfa", "export3d", "otavatar"):
        assert steps[f"train_{model}"][0] == "phase2"
        assert steps[f"animate_{model}"][0] == "phase2"
        assert steps[f"bench_train_{model}"][0] == "phase3"
    for step in ("fps_goha_full", "full_otavatar", "animate_otavatar_full", "full_mmfa",
                 "animate_mmfa_full", "bench_train_eg3d_compile"):
        assert step in steps
    # every cap fits one device command (10 minutes)
    assert all(0 < cap <= 600 for _, cap in steps.values())
    # a step function exists for every step of the table, and none without a row
    text = open(SCRIPT).read()
    functions = {line.split("()")[0][len("step_"):] for line in text.splitlines()
                 if line.startswith("step_") and "()" in line}
    assert functions == set(steps)


@pytest.mark.parametrize("args, message", [
    ((), "expected an output folder"),
    (("OUT", "phase4"), "unknown step or phase 'phase4'"),
    (("OUT", "--fast"), "unknown option --fast"),
    (("OUT", "--check", "--dry-run"), "give one of them"),
])
def test_bad_arguments_are_refused_naming_them(tmp_path, args, message):
    args = tuple(str(tmp_path / a) if a == "OUT" else a for a in args)
    res = _run(*args, env={"GPU_SESSION_WORK": str(tmp_path / "work")})
    assert res.returncode == 2
    assert message in res.stderr


def test_dry_run_writes_the_summary_and_the_archive(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    res = _run(str(out), "env,build", "--dry-run",
               env={"GPU_SESSION_WORK": str(work)}, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(os.listdir(out)) == ["gpu-session-dry-env-build-summary.tsv",
                                       "gpu-session-dry-env-build.tar.gz"]
    with open(out / "gpu-session-dry-env-build-summary.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [(r["step"], r["phase"], r["status"], r["rc"]) for r in rows] == [
        ("env", "phase1", "ok", "0"), ("build", "phase1", "ok", "0")]
    assert all(int(r["seconds"]) >= 0 and int(r["limit_s"]) > 0 for r in rows)
    with tarfile.open(out / "gpu-session-dry-env-build.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"dry-env-build/summary.tsv", "dry-env-build/versions.json",
            "dry-env-build/logs/01-env.log", "dry-env-build/logs/02-build.log"} <= names


def test_a_failing_step_is_recorded_and_the_budget_skips_the_rest(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    # animate without a trained run: refused for its missing input; the budget of 5 s leaves
    # no step room to start (each needs 15 s)
    res = _run(str(out), "animate_goha", "--dry-run", env={"GPU_SESSION_WORK": str(work)})
    assert res.returncode == 0, res.stdout + res.stderr
    rows = list(csv.DictReader(open(out / "gpu-session-dry-animate_goha-summary.tsv"),
                               delimiter="\t"))
    assert [(r["step"], r["status"], r["rc"]) for r in rows] == [
        ("animate_goha", "skipped-input", "98")]
    res = _run(str(out), "env", "info", "--dry-run",
               env={"GPU_SESSION_WORK": str(work), "GPU_SESSION_BUDGET_S": "5"})
    assert res.returncode == 0, res.stdout + res.stderr
    rows = list(csv.DictReader(open(out / "gpu-session-dry-env-info-summary.tsv"),
                               delimiter="\t"))
    assert [(r["step"], r["status"]) for r in rows] == [
        ("env", "skipped-budget"), ("info", "skipped-budget")]


def test_a_signal_stops_the_running_step_and_publishes(tmp_path):
    import signal
    import time

    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_SESSION_WORK": str(work)}
    proc = subprocess.Popen(["bash", SCRIPT, str(out), "data", "--dry-run"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = work / "results" / "dry-data" / "logs" / "01-data.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.2)      # the step has started (it printed its command)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, stdout
    assert "stopped by a signal during data" in stdout
    rows = list(csv.DictReader(open(out / "gpu-session-dry-data-summary.tsv"), delimiter="\t"))
    assert [(r["step"], r["status"], r["rc"]) for r in rows] == [("data", "interrupted", "143")]
    # the step's processes went with it: nothing writes the data set any more
    if shutil.which("pgrep"):
        time.sleep(1)
        res = subprocess.run(["pgrep", "-f", f"data synth --out {work}"], capture_output=True)
        assert res.returncode == 1, res.stdout


LINGERING = ("import signal, time; signal.signal(signal.SIGTERM, lambda *a: print('TERM: finishing',"
             " flush=True)); print('started', flush=True); time.sleep(120)")


@pytest.mark.skipif(shutil.which("ps") is None, reason="needs ps")
@pytest.mark.parametrize("command, rc", [
    # a timed-out step whose bash exits on SIGTERM while its Python process handles it
    ('"$PY" -c "$CODE"; echo not reached', 124),
    # a step that ended by itself, leaving a process behind
    ('"$PY" -c "$CODE" & sleep 1', 0)])
def test_no_process_of_a_step_outlives_it(tmp_path, command, rc):
    import time

    log = tmp_path / "step.log"
    env = {**os.environ, "GPU_SESSION_KILL_AFTER_S": "1", "PY": sys.executable, "CODE": LINGERING}
    t0 = time.monotonic()
    res = subprocess.run(["bash", SCRIPT, "__limited", "3", str(log), "bash", "-c", command], env=env, capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    seconds = time.monotonic() - t0
    assert res.returncode == rc, res.stdout + res.stderr
    text = log.read_text()
    assert "started" in text and "processes of this step were still running" in text, text
    assert seconds < 15, seconds             # the limit, then at most about KILL_AFTER more
    ps = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines()
                if "TERM: finishing" in line and not line.startswith("Z")], ps


def _rows(path):
    with open(path) as f:
        return [(r["step"], r["status"], r["rc"]) for r in csv.DictReader(f, delimiter="\t")]


CHECKED = "build,gpu_tests,train_otavatar,animate_goha"


def test_check_passes_the_gpu_command_lines_without_running_them(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    res = _run(str(out), CHECKED, "--check", env={"GPU_SESSION_WORK": str(work)}, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    label = "check-" + CHECKED.replace(",", "-")
    assert sorted(os.listdir(out)) == [f"gpu-session-{label}-summary.tsv",
                                       f"gpu-session-{label}.tar.gz"]
    assert _rows(out / f"gpu-session-{label}-summary.tsv") == [
        (s, "ok", "0") for s in CHECKED.split(",")]
    logs = work / "results" / label / "logs"
    train = (logs / "03-train_otavatar.log").read_text()
    # the GPU run's own sizes and device, its stage's config checked, nothing trained
    assert "--set train.device=cuda" in train and "--set train.num_workers=8" in train
    assert "pyface train: arguments checked" in train
    assert "stage run" not in train and not (work / "runs" / "otavatar").exists()
    assert "tests collected" in (logs / "02-gpu_tests.log").read_text()
    assert "--frames 64 --batch 8 --device cuda" in (logs / "04-animate_goha.log").read_text()


def test_check_fails_a_step_whose_gpu_command_line_is_broken(tmp_path):
    # a copy of the script whose GPU lines carry an unknown --set key of a stage, an unknown
    # option and an unknown preset; the copy runs the tree's pyface and tools
    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    for name in ("pyface", "tools"):
        os.symlink(os.path.join(ROOT, name), tree / name)
    text = open(SCRIPT).read()
    edits = [('gpu-short "$STEPS_OTAVATAR" "$STEPS_STAGE" eg3d',
              'gpu-short "$STEPS_OTAVATAR" "$STEPS_STAGE" eg3d -- --set stages.eg3d.train.stepz=1'),
             ('--frames "$ANIM_FRAMES" --batch "$ANIM_BATCH"',
              '--frames "$ANIM_FRAMES" --batchh "$ANIM_BATCH"'),
             ('bench_train goha --no-compile', 'bench_train goha --preset gpu-shirt --no-compile')]
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    (tree / "bench" / "gpu_session.sh").write_text(text)
    out, work = tmp_path / "out", tmp_path / "work"
    steps = "train_otavatar,animate_goha,bench_train_goha"
    res = subprocess.run(["bash", str(tree / "bench" / "gpu_session.sh"), str(out), steps,
                          "--check"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHON": sys.executable,
                              "GPU_SESSION_WORK": str(work)})
    assert res.returncode == 1, res.stdout + res.stderr
    label = "check-" + steps.replace(",", "-")
    assert _rows(out / f"gpu-session-{label}-summary.tsv") == [
        ("train_otavatar", "failed", "2"),
        ("animate_goha", "failed", "2"), ("bench_train_goha", "failed", "2")]
    logs = work / "results" / label / "logs"
    err = (logs / "01-train_otavatar.log").read_text()
    assert "stage 'eg3d'" in err and "train.stepz" in err, err
    assert "unrecognized arguments: --batchh" in (logs / "02-animate_goha.log").read_text()
    assert "gpu-shirt" in (logs / "03-bench_train_goha.log").read_text()
