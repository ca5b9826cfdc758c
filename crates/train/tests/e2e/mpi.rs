//! Data parallel over MPI processes (feature `mpi`), on one machine over loopback: Open MPI as
//! root, oversubscribed, TCP on `lo`. Skipped, with a printed reason, when `mpirun` is absent.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// `mpirun -np N` with the loopback settings, running `train`; `None` (and a printed reason)
/// when Open MPI's `mpirun` is not installed.
fn mpirun(np: usize, extra_mca: &[(&str, &str)]) -> Option<Command> {
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: mpirun is not installed (apt install openmpi-bin libopenmpi-dev)");
        return None;
    }
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ]);
    let mut mca = vec![
        ("pml", "ob1"),
        ("btl", "self,tcp"),
        ("btl_tcp_if_include", "lo"),
    ];
    mca.extend_from_slice(extra_mca);
    for (key, value) in mca {
        cmd.args(["--mca", key, value]);
    }
    // One thread per rank: two ranks share the test machine's cores.
    cmd.args(["-x", "RAYON_NUM_THREADS=1"]);
    cmd.arg(env!("CARGO_BIN_EXE_train"));
    Some(cmd)
}

/// The quickstart config, 8 steps, logged every step, checkpoints at 4 and 8, on flex.
const SETS: [&str; 6] = [
    "train.steps=8",
    "train.log_every=1",
    "train.eval_every=0",
    "train.checkpoint_every=4",
    "train.keep_checkpoints=3",
    "train.backend=\"flex\"",
];

fn with_run_dir<'a>(cmd: &'a mut Command, config: &Path, run_dir: &Path) -> &'a mut Command {
    cmd.arg("--config")
        .arg(config)
        .args(["--set", &format!("train.run_dir=\"{}\"", run_dir.display())]);
    for s in SETS {
        cmd.args(["--set", s]);
    }
    cmd
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    (diff / norm).sqrt()
}

fn assert_same_run(what: &str, a: &Path, b: &Path) {
    let (la, lb) = (losses(&metrics(a), "train"), losses(&metrics(b), "train"));
    assert_eq!(la.len(), 8, "{what}: {la:?}");
    assert_eq!(la.len(), lb.len(), "{what}");
    let mut bit_exact = true;
    for ((step, x), (_, y)) in la.iter().zip(&lb) {
        bit_exact &= x.to_bits() == y.to_bits();
        assert!(
            (x - y).abs() <= 1e-5 * x.abs(),
            "{what}, step {step}: {x} vs {y}"
        );
    }
    let (wa, wb) = (checkpoint_weights(a, 8), checkpoint_weights(b, 8));
    let rel = relative_l2(&wa, &wb);
    bit_exact &= wa.iter().zip(&wb).all(|(x, y)| x.to_bits() == y.to_bits());
    eprintln!("{what}: final weights differ by {rel:e} (relative L2); bit-exact: {bit_exact}");
    assert!(
        rel <= 1e-5,
        "{what}: weights after 8 steps differ by {rel:e}"
    );
}

/// `mpirun -np 2 train` (gradients summed in chunks of 1,000 elements, so the chunked
/// all-reduce runs) takes the same 8 steps as one process and as one process on two devices
/// (flex + ndarray): losses within 1e-5 relative, final weights within 1e-5 relative L2. Only
/// rank 0 prints and writes; the metrics carry the all-reduce's size and time; the checkpoint
/// records the world size. Then resumes across world sizes: a 2-rank run cut at step 4 resumed
/// by one process, and a one-process run cut at step 4 resumed by 2 ranks, both end where the
/// uninterrupted one-process run does.
#[test]
fn two_ranks_train_like_one_process_and_resume_at_another_world_size() {
    let Some(mut two_ranks) = mpirun(2, &[]) else {
        return;
    };
    let dir = scratch("mpi-parity");
    let config = repo_config("quickstart");
    let one = dir.join("one");
    ok(&run(with_run_dir(&mut train_bin(), &config, &one)));
    let devices = dir.join("devices");
    ok(&run(with_run_dir(&mut train_bin(), &config, &devices)
        .args(["--set", "train.devices=[\"flex\", \"ndarray\"]"])));
    let ranks = dir.join("ranks");
    let out = run(with_run_dir(&mut two_ranks, &config, &ranks).env("MIXLAB_MPI_CHUNK", "1000"));
    ok(&out);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stderr.contains("MPI data parallel over 2 ranks"),
        "{stderr}"
    );
    assert_eq!(stdout.matches("done at step 8").count(), 1, "{stdout}");
    let lines = metrics(&ranks);
    let train: Vec<_> = lines.iter().filter(|l| l["split"] == "train").collect();
    assert_eq!(
        train.len(),
        8,
        "one metrics line per step, from rank 0 alone"
    );
    assert_eq!(train[0]["world_size"], 2);
    let mb = train[0]["all_reduce_mb"].as_f64().unwrap();
    let params = checkpoint_weights(&ranks, 8).len() as f64;
    assert!(mb >= params * 4.0 / 1e6, "{mb} MB for {params} parameters");
    eprintln!(
        "all-reduce: {mb:.3} MB per step, {:.2} ms (step 8)",
        train[7]["all_reduce_ms"].as_f64().unwrap()
    );
    let manifest = std::fs::read_to_string(ranks.join("checkpoints/step-8/manifest.json")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(manifest["world_size"], 2);
    assert_same_run("2 ranks vs one process", &one, &ranks);
    assert_same_run("2 ranks vs one process on 2 devices", &devices, &ranks);

    // 2 ranks -> 1 process.
    std::fs::remove_dir_all(ranks.join("checkpoints/step-8")).unwrap();
    let out = run(train_bin().arg("--resume").arg(&ranks));
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("written by 2 rank(s), this run has 1"),
        "{stderr}"
    );
    assert_same_run("2 ranks resumed by one process", &one, &ranks);

    // 1 process -> 2 ranks.
    let cut = dir.join("cut");
    ok(&run(with_run_dir(&mut train_bin(), &config, &cut)));
    std::fs::remove_dir_all(cut.join("checkpoints/step-8")).unwrap();
    let out = run(mpirun(2, &[]).unwrap().arg("--resume").arg(&cut));
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resumed at step 4"), "{stderr}");
    assert!(
        stderr.contains("written by 1 rank(s), this run has 2"),
        "{stderr}"
    );
    assert_same_run("one process resumed by 2 ranks", &one, &cut);
}

/// A model with a cache under `mpirun -np 2`: each rank carries the cache of its own 2 of the
/// 4 streams, a checkpoint gathers every stream's. The 2-rank run takes the steps of one
/// process; cut at step 4 and resumed by 2 ranks it repeats itself bit for bit; resumed by
/// one process (which takes all 4 streams' caches) it ends where the others do.
#[test]
fn two_ranks_carry_their_streams_caches_and_resume_at_any_world_size() {
    let Some(mut two_ranks) = mpirun(2, &[]) else {
        return;
    };
    let dir = scratch("mpi-cached");
    let config = write_cached_config(&dir, |t| t.replace("dropout = 0.1", "dropout = 0.0"));
    let one = dir.join("one");
    ok(&run(with_run_dir(&mut train_bin(), &config, &one)));
    let ranks = dir.join("ranks");
    ok(&run(with_run_dir(&mut two_ranks, &config, &ranks)));
    assert_same_run("2 ranks with a cache vs one process", &one, &ranks);
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ranks.join("checkpoints/step-8/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        manifest["cache"]["rows"], 4,
        "every stream's cache: {manifest}"
    );

    // 2 ranks -> 2 ranks: bit for bit.
    let cut = dir.join("cut");
    ok(&run(with_run_dir(
        &mut mpirun(2, &[]).unwrap(),
        &config,
        &cut,
    )));
    std::fs::remove_dir_all(cut.join("checkpoints/step-8")).unwrap();
    ok(&run(mpirun(2, &[]).unwrap().arg("--resume").arg(&cut)));
    let (a, b) = (
        losses(&metrics(&ranks), "train"),
        losses(&metrics(&cut), "train"),
    );
    assert_eq!(a.len(), 8);
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x.to_bits(), y.to_bits(), "step {step}: {x} vs {y}");
    }
    assert!(
        checkpoint_weights(&ranks, 8) == checkpoint_weights(&cut, 8),
        "the resumed 2-rank run's final weights differ"
    );

    // 2 ranks -> 1 process.
    std::fs::remove_dir_all(cut.join("checkpoints/step-8")).unwrap();
    ok(&run(train_bin().arg("--resume").arg(&cut)));
    assert_same_run("2 ranks with a cache resumed by one process", &one, &cut);
}

/// A long 2-rank run, started in the background with its output captured.
fn spawn_long_run(cmd: &mut Command, run_dir: &Path, checkpoint_every: usize) -> Child {
    let config = repo_config("quickstart");
    let every = format!("train.checkpoint_every={checkpoint_every}");
    with_run_dir(cmd, &config, run_dir)
        .args(["--set", "train.steps=100000", "--set", &every])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The rank `rank` process among `mpirun`'s children (Open MPI starts local ranks itself and
/// gives each `OMPI_COMM_WORLD_RANK`).
fn rank_pid(mpirun: u32, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces): state, ppid, ...
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let ppid = after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(mpirun) {
            continue;
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

fn wait_with_deadline(mut child: Child, limit: Duration) -> (Output, Duration) {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("mpirun did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = started.elapsed();
    (child.wait_with_output().unwrap(), took)
}

/// kill -9 of rank 1 of a running `mpirun`; then its output and how long it took to exit
/// (at most 60 s).
fn kill_rank_1(child: Child) -> (Output, Duration) {
    let pid = rank_pid(child.id(), 1).expect("rank 1 among mpirun's children");
    assert!(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    wait_with_deadline(child, Duration::from_secs(60))
}

/// The step of the newest checkpoint of `run_dir`, which must verify.
fn newest_checkpoint_step(run_dir: &Path) -> usize {
    let newest = mixlab_train::checkpoint::latest_valid(run_dir, &mut |c, why| {
        panic!("checkpoint {} does not verify: {why:#}", c.display())
    })
    .unwrap()
    .expect("a complete checkpoint");
    newest.1.step
}

/// kill -9 of rank 1 mid-run: `mpirun` exits non-zero within 60 s naming rank 1, the newest
/// checkpoint verifies, and `--resume` under `mpirun` finishes the run from it.
#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_from_its_last_checkpoint() {
    let Some(mut cmd) = mpirun(2, &[]) else {
        return;
    };
    let dir = scratch("mpi-kill");
    let run_dir = dir.join("run");
    let mut child = spawn_long_run(&mut cmd, &run_dir, 2);
    assert!(
        wait_for_lines(&run_dir, 5, &mut child),
        "the run ended early"
    );
    let (out, took) = kill_rank_1(child);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "mpirun exited {:?} {took:?} after rank 1 was killed",
        out.status.code()
    );
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rank 1"),
        "the message names the dead rank: {stderr}"
    );

    let last = newest_checkpoint_step(&run_dir);
    assert_eq!(checkpoint_steps(&run_dir).last(), Some(&(last as u64)));
    let out = run(mpirun(2, &[])
        .unwrap()
        .arg("--resume")
        .arg(&run_dir)
        .args(["--set", &format!("train.steps={}", last + 2)]));
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("resumed at step {last}")),
        "{stderr}"
    );
    assert_eq!(checkpoint_steps(&run_dir).last(), Some(&(last as u64 + 2)));
}

/// SIGINT to `mpirun`: Open MPI 4.1 sends the ranks SIGCONT, waits `odls_base_sigkill_timeout`
/// seconds, sends SIGTERM, waits as long again, then SIGKILL. On SIGTERM every rank stops at
/// the same step (the flag travels in the step's all-reduce), rank 0 writes one checkpoint
/// there, and every rank exits 0. `mpirun` itself reports the job it was asked to end as failed
/// (exit 1, even when every rank exits 0; a plain C MPI program does the same), so the ranks'
/// own exit codes are read through a shell that reports them.
#[test]
fn sigint_to_mpirun_stops_every_rank_at_one_step_with_one_checkpoint() {
    let Some(cmd) = mpirun(2, &[("odls_base_sigkill_timeout", "10")]) else {
        return;
    };
    let dir = scratch("mpi-sigint");
    let run_dir: PathBuf = dir.join("run");
    // The shell ignores SIGTERM (train installs its own handler) and reports train's exit code.
    let mut args = cmd.get_args().map(|a| a.to_owned()).collect::<Vec<_>>();
    let train = args.pop().expect("the train binary");
    let mut cmd = Command::new("mpirun");
    cmd.args(args).args([
        "sh",
        "-c",
        "trap '' TERM; \"$0\" \"$@\"; echo \"rank $OMPI_COMM_WORLD_RANK exit $?\" >&2",
    ]);
    cmd.arg(train);
    let mut child = spawn_long_run(&mut cmd, &run_dir, 100_000);
    assert!(
        wait_for_lines(&run_dir, 3, &mut child),
        "the run ended early"
    );
    let mpirun = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &mpirun])
            .status()
            .unwrap()
            .success()
    );
    let (out, took) = wait_with_deadline(child, Duration::from_secs(60));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    eprintln!(
        "mpirun exited {:?} {took:?} after SIGINT",
        out.status.code()
    );
    for rank in 0..2 {
        assert!(stderr.contains(&format!("rank {rank} exit 0")), "{stderr}");
    }
    assert!(!stderr.contains("MPI_ABORT"), "{stderr}");
    assert!(stdout.starts_with("stopped at step"), "{stdout}");
    let steps = checkpoint_steps(&run_dir);
    assert_eq!(steps.len(), 1, "one checkpoint: {steps:?}");
    assert!(
        stdout.contains(&format!("stopped at step {} ", steps[0])),
        "{stdout}"
    );
    let lines = metrics(&run_dir);
    let last = lines
        .iter()
        .filter_map(|l| l["step"].as_u64())
        .max()
        .unwrap();
    assert_eq!(last, steps[0], "rank 0 logged no step past the checkpoint");
}

/// kill -9 of rank 1 mid-run with a cache (checkpoints every 2 steps): the job ends, and
/// `--resume` under `mpirun` (every stream's cache from the newest checkpoint, each rank
/// taking its own rows) finishes with the training losses and final weights of the
/// uninterrupted 2-rank run, bit for bit.
#[test]
fn a_killed_rank_with_a_cache_resumes_bit_for_bit() {
    let Some(mut cmd) = mpirun(2, &[]) else {
        return;
    };
    let dir = scratch("mpi-kill-cached");
    let config = write_cached_config(&dir, |t| t.replace("dropout = 0.1", "dropout = 0.0"));
    let sets = [
        "--set",
        "train.steps=60",
        "--set",
        "train.checkpoint_every=2",
    ];
    let whole = dir.join("whole");
    ok(&run(with_run_dir(
        &mut mpirun(2, &[]).unwrap(),
        &config,
        &whole,
    )
    .args(sets)));

    let run_dir = dir.join("killed");
    let mut child = with_run_dir(&mut cmd, &config, &run_dir)
        .args(sets)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_for_lines(&run_dir, 12, &mut child),
        "the run ended early"
    );
    let (out, _) = kill_rank_1(child);
    assert!(!out.status.success(), "the job survived its rank's death");
    let last = newest_checkpoint_step(&run_dir);
    assert!(last > 0 && last < 60, "killed at step {last}");

    let out = run(mpirun(2, &[]).unwrap().arg("--resume").arg(&run_dir));
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("resumed at step {last}")),
        "{stderr}"
    );
    let (a, b) = (
        losses(&metrics(&whole), "train"),
        losses(&metrics(&run_dir), "train"),
    );
    assert_eq!((a.len(), b.len()), (60, 60));
    for ((step, x), (_, y)) in a.iter().zip(&b) {
        assert_eq!(x.to_bits(), y.to_bits(), "step {step}: {x} vs {y}");
    }
    assert!(
        checkpoint_weights(&whole, 60) == checkpoint_weights(&run_dir, 60),
        "the resumed run's final weights differ"
    );
}
