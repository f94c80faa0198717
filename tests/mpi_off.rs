//! Without the `mpi` feature: asking for data parallelism is a clear error (exit 2), never a
//! silent single-process run — neither `--sync-bn` nor being started as one of several ranks.
#![cfg(not(feature = "mpi"))]

use std::process::Command;

fn senet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_senet"))
}

#[test]
fn sync_bn_without_the_feature_says_how_to_build() {
    let o = senet().args(["train", "--dataset", "sample", "--sync-bn"]).output().expect("run senet");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("built without MPI support") && stderr.contains("--features mpi"), "{stderr}");
}

#[test]
fn started_as_one_of_several_ranks_without_the_feature_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = senet()
        .args(["train", "--dataset", "sample", "--limit-train", "8", "--width", "0.0625", "--out"])
        .arg(&out)
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .env("OMPI_COMM_WORLD_RANK", "1")
        .output()
        .expect("run senet");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("one of 2 MPI ranks") && stderr.contains("--features mpi"), "{stderr}");
    assert!(!out.exists(), "nothing may be written");
}
