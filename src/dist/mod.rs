//! Data-parallel training over MPI (cargo feature `mpi`): which rank this process is, and the
//! few collectives the training loop needs — an all-reduce of the flat gradient buffer, sums of
//! metrics, a broadcast from rank 0 and a gather of checksums.
//!
//! Without the feature (or outside `mpirun`) a [`Dist`] is the single process: rank 0 of 1, and
//! every collective is the identity. The loop calls the same functions either way.
//!
//! Semantics follow PyTorch's DistributedDataParallel, so recipes carry over: `--batch-size` is
//! per rank, each epoch's permutation is the same on every rank and padded to a multiple of the
//! rank count (DistributedSampler), gradients are averaged (sum, then / N) once per step, batch
//! norm uses per-rank batch statistics, and rank 0's running statistics are the model's
//! (DDP's `broadcast_buffers`). With `--sync-bn` every batch norm's statistics are those of all
//! ranks' batches together, as SyncBatchNorm's (`model::data_parallel::exchange_bn`).

use anyhow::Result;

/// Environment variables a launcher sets: (world size, local rank). OpenMPI's `mpirun` first,
/// then MPICH/Hydra and PMIx launchers.
const SIZE_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"];
const LOCAL_RANK_VARS: [&str; 2] = ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"];

/// What a launcher told this process through its environment (read by the CLI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Launch {
    /// The rank count it announced, and the variable that said so; None outside a launcher.
    pub size: Option<(usize, &'static str)>,
    /// This process's rank among those on its machine (0 when none is given).
    pub local_rank: usize,
}

impl Launch {
    /// From the launcher's variables, `var` looking one up.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Launch {
        let number = |k: &str| var(k)?.trim().parse::<usize>().ok();
        Launch {
            size: SIZE_VARS.iter().find_map(|&k| number(k).map(|n| (n, k))),
            local_rank: LOCAL_RANK_VARS.iter().find_map(|&k| number(k)).unwrap_or(0),
        }
    }
}

pub use crate::exit::Collective;

/// The collectives a data-parallel job needs, as one process sees them. [`SingleProcess`] is the
/// job of one (every collective the identity); with the `mpi` feature, `mpi_impl::Mpi` runs them
/// over MPI's world communicator.
pub trait Collectives {
    /// Element-wise sum over the ranks, in place.
    fn all_reduce_sum_f32(&self, v: &mut [f32]) -> Result<()>;
    /// Element-wise sum over the ranks, in place.
    fn all_reduce_sum_f64(&self, v: &mut [f64]) -> Result<()>;
    /// Rank 0's `v` on every rank (every rank's `v` has the same length).
    fn broadcast_f32(&self, v: &mut [f32]) -> Result<()>;
    /// Rank `root`'s bytes on every rank (any length).
    fn broadcast_bytes(&self, root: usize, bytes: Vec<u8>) -> Result<Vec<u8>>;
    /// Every rank's `x`, in rank order.
    fn all_gather_u64(&self, x: u64) -> Result<Vec<u64>>;
    /// Every rank's `v` (all the same length), concatenated in rank order.
    fn all_gather_f32(&self, v: &[f32]) -> Result<Vec<f32>>;
    /// Wait until every rank is here.
    fn barrier(&self);
    /// End every rank of the job with `code` (one rank failed alone). One process: nothing to do.
    fn abort(&self, code: i32);
}

/// The job of one process: rank 0 of 1.
pub struct SingleProcess;

impl Collectives for SingleProcess {
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _: usize, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(bytes)
    }
    fn all_gather_u64(&self, x: u64) -> Result<Vec<u64>> {
        Ok(vec![x])
    }
    fn all_gather_f32(&self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }
    fn barrier(&self) {}
    fn abort(&self, _: i32) {}
}

/// This process's place in the job, and the collectives that reach the other ranks.
pub struct Dist {
    pub rank: usize,
    pub size: usize,
    /// The rank among the processes on this machine (adapter choice).
    pub local_rank: usize,
    comm: Box<dyn Collectives>,
}

impl Dist {
    /// The single process: rank 0 of 1.
    pub fn single() -> Dist {
        Dist { rank: 0, size: 1, local_rank: 0, comm: Box::new(SingleProcess) }
    }

    /// Rank `rank` of `size` over the given collectives (a test's stand-in for the other ranks).
    pub fn with_collectives(rank: usize, size: usize, comm: Box<dyn Collectives>) -> Dist {
        Dist { rank, size, local_rank: rank, comm }
    }

    /// Join the MPI job when a launcher started this process, else the single process. Without
    /// the `mpi` feature, being one of several launched ranks is an error: each would train alone.
    pub fn init(launch: &Launch) -> Result<Dist> {
        let Some((size, size_var)) = launch.size else { return Ok(Dist::single()) };
        #[cfg(feature = "mpi")]
        {
            let _ = (size, size_var);
            mpi_impl::init(launch.local_rank)
        }
        #[cfg(not(feature = "mpi"))]
        {
            if size > 1 {
                anyhow::bail!(
                    "this process is one of {size} MPI ranks (the launcher set {}), but this senet was built \
                     without MPI support, so each rank would train alone; rebuild with `cargo build --release \
                     --features mpi` (see docs/distributed.md)",
                    size_var
                );
            }
            Ok(Dist::single())
        }
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// "rank 1 of 2", for messages.
    pub fn who(&self) -> String {
        format!("rank {} of {}", self.rank, self.size)
    }

    /// Element-wise sum over the ranks, in place (the host-staged gradient all-reduce).
    pub fn all_reduce_sum_f32(&self, v: &mut [f32]) -> Result<()> {
        self.comm.all_reduce_sum_f32(v)
    }

    /// Element-wise sum over the ranks, in place (metric sums).
    pub fn all_reduce_sum_f64(&self, v: &mut [f64]) -> Result<()> {
        self.comm.all_reduce_sum_f64(v)
    }

    /// Rank 0's `v` on every rank (the other ranks' `v` give the length; it must agree).
    pub fn broadcast_f32(&self, v: &mut [f32]) -> Result<()> {
        self.comm.broadcast_f32(v)
    }

    /// Rank 0's bytes on every rank (any length).
    pub fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        self.comm.broadcast_bytes(0, bytes)
    }

    /// Every rank's `x`, in rank order.
    pub fn all_gather_u64(&self, x: u64) -> Result<Vec<u64>> {
        self.comm.all_gather_u64(x)
    }

    /// Every rank's bytes (any length), in rank order.
    pub fn all_gather_bytes(&self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        (0..self.size).map(|r| self.comm.broadcast_bytes(r, bytes.clone())).collect()
    }

    /// Every rank's `v` (all the same length), concatenated in rank order.
    pub fn all_gather_f32(&self, v: &[f32]) -> Result<Vec<f32>> {
        self.comm.all_gather_f32(v)
    }

    /// Wait until every rank is here, sleeping meanwhile (an MPI barrier spins on its core, which
    /// would slow a rank sharing it: `bench` times rank 0 alone while the others wait here).
    pub fn barrier(&self) {
        self.comm.barrier()
    }

    /// Rank 0's outcome of a step only it takes (opening the run folder, reading `--resume`'s
    /// settings) on every rank: `Ok` everywhere, or a [`Collective`] error everywhere — rank 0's
    /// message there, empty elsewhere — so the ranks end together, with no abort. The other
    /// ranks pass `Ok(())`.
    pub fn agree_with_root<T>(&self, outcome: Result<T>) -> Result<T> {
        if self.size <= 1 {
            return outcome;
        }
        let msg = match (&outcome, self.is_root()) {
            (Err(e), true) => format!("{e:#}"),
            _ => String::new(),
        };
        let msg = String::from_utf8_lossy(&self.broadcast_bytes(msg.into_bytes())?).into_owned();
        if msg.is_empty() { outcome } else { Err(Collective(if self.is_root() { msg } else { String::new() }).into()) }
    }

    /// A value rank 0 computes (`f` runs there only), sent to every rank as JSON; an error there is
    /// every rank's, as in [`Dist::agree_with_root`].
    pub fn from_root<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T>
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        if self.size <= 1 {
            return f();
        }
        let mine = if self.is_root() { f().and_then(|v| Ok(serde_json::to_vec(&v)?)) } else { Ok(Vec::new()) };
        let mine = self.agree_with_root(mine)?;
        let bytes = self.broadcast_bytes(mine)?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// True on every rank when `flag` is true on any.
    pub fn any(&self, flag: bool) -> Result<bool> {
        let mut v = [f64::from(u8::from(flag))];
        self.all_reduce_sum_f64(&mut v)?;
        Ok(v[0] > 0.0)
    }

    /// End the whole job after an error on this rank alone: print it with the rank and abort
    /// every rank (they may be waiting in a collective this one will never reach). A
    /// [`Collective`] error, or a single process, returns it for the caller to end normally.
    pub fn end_on_error(&self, e: anyhow::Error, code: i32) -> anyhow::Error {
        if self.size <= 1 {
            return e;
        }
        // Errors every rank reached together: rank 0 says it, then all wait for each other before
        // exiting, or mpirun, seeing one rank exit non-zero, would kill rank 0 before it spoke.
        if e.downcast_ref::<Collective>().is_some() {
            if self.is_root() {
                eprintln!("error: {e:#}");
            }
            self.barrier();
            return anyhow::Error::new(Collective(String::new()));
        }
        // Every rank stopped after the same step (the signal flag rode the all-reduce).
        if let Some(i) = e.downcast_ref::<crate::exit::Interrupted>() {
            if self.is_root() {
                eprintln!("{i}");
            }
            self.barrier();
            return anyhow::Error::new(crate::exit::Interrupted {
                out: i.out.clone(),
                saved: i.saved.clone(),
                quiet: true,
                ..*i
            });
        }
        eprintln!("error on {}: {e:#}", self.who());
        self.comm.abort(code);
        e
    }
}

/// The sample indices rank `rank` of `size` trains on in one epoch, from the epoch's order over
/// all samples (PyTorch's DistributedSampler): the order padded with its own first indices to a
/// multiple of `size`, then every `size`-th from position `rank`. Every rank gets the same count.
pub fn shard(order: &[usize], rank: usize, size: usize) -> Vec<usize> {
    if size <= 1 || order.is_empty() {
        return order.to_vec();
    }
    let total = order.len().div_ceil(size) * size;
    (rank..total).step_by(size).map(|i| order[i % order.len()]).collect()
}

/// A cheap checksum of f32 values by their bits (FNV-1a over the words): equal weights on two
/// ranks give equal sums; any differing bit almost surely does not.
pub fn checksum(v: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in v {
        h ^= u64::from(x.to_bits());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(feature = "mpi")]
mod mpi_impl {
    use anyhow::{Context, Result, ensure};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use super::{Collectives, Dist};

    pub struct Mpi {
        world: SimpleCommunicator,
        // Last: dropping the universe finalises MPI, after the communicator is gone.
        _universe: Universe,
    }

    pub fn init(local_rank: usize) -> Result<Dist> {
        let universe = mpi::initialize().context("MPI could not be initialised (MPI_Init failed or ran twice)")?;
        let world = universe.world();
        let (rank, size) = (world.rank(), world.size());
        ensure!(rank >= 0 && size >= 1, "MPI gave rank {rank} of {size}");
        Ok(Dist {
            rank: rank as usize,
            size: size as usize,
            local_rank,
            comm: Box::new(Mpi { world, _universe: universe }),
        })
    }

    impl Collectives for Mpi {
        fn all_reduce_sum_f32(&self, v: &mut [f32]) -> Result<()> {
            if v.is_empty() {
                return Ok(()); // an empty slice's pointer is 0x1: MPI_IN_PLACE to OpenMPI
            }
            let send = v.to_vec();
            self.world.all_reduce_into(&send[..], v, SystemOperation::sum());
            Ok(())
        }

        fn all_reduce_sum_f64(&self, v: &mut [f64]) -> Result<()> {
            if v.is_empty() {
                return Ok(());
            }
            let send = v.to_vec();
            self.world.all_reduce_into(&send[..], v, SystemOperation::sum());
            Ok(())
        }

        fn broadcast_f32(&self, v: &mut [f32]) -> Result<()> {
            if !v.is_empty() {
                self.world.process_at_rank(0).broadcast_into(v);
            }
            Ok(())
        }

        fn broadcast_bytes(&self, root: usize, mut bytes: Vec<u8>) -> Result<Vec<u8>> {
            let root = self.world.process_at_rank(root as i32);
            let mut len = [bytes.len() as u64];
            root.broadcast_into(&mut len[..]);
            bytes.resize(len[0] as usize, 0);
            // Never an empty slice: its dangling pointer is 0x1, which OpenMPI reads as MPI_IN_PLACE.
            if !bytes.is_empty() {
                root.broadcast_into(&mut bytes[..]);
            }
            Ok(bytes)
        }

        fn all_gather_u64(&self, x: u64) -> Result<Vec<u64>> {
            let mut all = vec![0u64; self.world.size() as usize];
            self.world.all_gather_into(&x, &mut all[..]);
            Ok(all)
        }

        fn all_gather_f32(&self, v: &[f32]) -> Result<Vec<f32>> {
            let mut all = vec![0f32; v.len() * self.world.size() as usize];
            if !v.is_empty() {
                self.world.all_gather_into(v, &mut all[..]);
            }
            Ok(all)
        }

        fn barrier(&self) {
            let mut req = self.world.immediate_barrier();
            loop {
                match req.test() {
                    Ok(_) => return,
                    Err(r) => req = r,
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }

        fn abort(&self, code: i32) {
            self.world.abort(code)
        }
    }
}

#[cfg(test)]
mod launch_tests {
    use super::Launch;

    fn from(pairs: &[(&str, &str)]) -> Launch {
        Launch::from_vars(|k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn the_launchers_variables_give_size_and_local_rank() {
        assert_eq!(from(&[]), Launch { size: None, local_rank: 0 });
        let ompi = from(&[("OMPI_COMM_WORLD_SIZE", " 4 "), ("OMPI_COMM_WORLD_LOCAL_RANK", "2")]);
        assert_eq!(ompi, Launch { size: Some((4, "OMPI_COMM_WORLD_SIZE")), local_rank: 2 });
        let hydra = from(&[("PMI_SIZE", "3"), ("MPI_LOCALRANKID", "1")]);
        assert_eq!(hydra, Launch { size: Some((3, "PMI_SIZE")), local_rank: 1 });
        // A value that is not a number is not a launch.
        assert_eq!(from(&[("OMPI_COMM_WORLD_SIZE", "four"), ("PMIX_SIZE", "2")]).size, Some((2, "PMIX_SIZE")));
    }
}
