//! The processes of a run: one (the default), or the ranks of an MPI job started by `mpirun` or
//! `srun` (cargo feature `mpi`). This is the transport only: sums, broadcasts and barriers of
//! host buffers; what travels (gradients, the loss, the stop flag, weight hashes) is the
//! business of the `distributed` module.
//!
//! A launcher is recognised by the variables it sets for each rank (Open MPI's
//! `OMPI_COMM_WORLD_SIZE`, MPICH/Hydra's `PMI_SIZE`, Slurm's `SLURM_STEP_NUM_TASKS`); MPI is
//! initialised only then, so a plain `train` of an MPI build never touches the MPI library. A
//! build without the feature started as one of several ranks refuses to start: each rank would
//! otherwise train alone and all of them would write the same run directory.

use std::ops::Range;

use anyhow::Result;

/// The largest count one MPI call is given: counts are 32-bit (`int`), so bigger buffers
/// travel in chunks of this many elements (1 GiB of f32).
pub const MAX_CHUNK: usize = 1 << 28;

/// Where this process stands among the run's processes.
pub struct World {
    rank: usize,
    size: usize,
    /// Elements per MPI call (`MIXLAB_MPI_CHUNK` overrides [`MAX_CHUNK`], for the tests).
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    chunk: usize,
    comm: Comm,
}

enum Comm {
    Alone,
    #[cfg(feature = "mpi")]
    Mpi(mpi_comm::MpiComm),
}

/// A launcher's view of this process: `(rank, size, the variable that said so)`, or `None`
/// when no launcher started it. `var` reads the environment (a parameter for the tests).
pub fn launched_as(var: impl Fn(&str) -> Option<String>) -> Option<(usize, usize, &'static str)> {
    let read = |name: &str| var(name).and_then(|v| v.trim().parse::<usize>().ok());
    for (size, rank) in [
        ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
        ("PMI_SIZE", "PMI_RANK"),
        ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),
    ] {
        if let (Some(n), Some(r)) = (read(size), read(rank)) {
            return Some((r, n, size));
        }
    }
    None
}

impl World {
    /// A run of one process.
    pub fn alone() -> Self {
        Self {
            rank: 0,
            size: 1,
            chunk: MAX_CHUNK,
            comm: Comm::Alone,
        }
    }

    /// The world this process was started in: an MPI world under `mpirun`/`srun` (with the
    /// `mpi` feature), else one process. Without the feature, several ranks are refused.
    pub fn from_environment() -> Result<Self> {
        let launched = launched_as(|name| std::env::var(name).ok());
        let chunk = std::env::var("MIXLAB_MPI_CHUNK")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&c| c > 0)
            .map_or(MAX_CHUNK, |c| c.min(MAX_CHUNK));
        match launched {
            None => Ok(Self::alone()),
            Some((rank, size, var)) => Self::launched(rank, size, var, chunk),
        }
    }

    #[cfg(not(feature = "mpi"))]
    fn launched(rank: usize, size: usize, var: &str, _chunk: usize) -> Result<Self> {
        if size > 1 {
            anyhow::bail!("{}", refusal(rank, size, var));
        }
        Ok(Self::alone())
    }

    #[cfg(feature = "mpi")]
    fn launched(_rank: usize, size: usize, var: &str, chunk: usize) -> Result<Self> {
        let comm = mpi_comm::MpiComm::init()?;
        if comm.size() != size {
            // E.g. a binary linked to another MPI than the launcher's: each rank would be a
            // world of one and train alone into the same run directory.
            comm.abort_with(&format!(
                "the launcher started {size} ranks ({var} = {size}) but MPI sees a world of \
                 {}: this train is linked to another MPI library than the launcher's, or \
                 srun lacks --mpi=pmix; launch with the mpirun of the MPI it was built against",
                comm.size()
            ));
        }
        // Every rank must cut the buffers into the same chunks: rank 0's size wins (the
        // variable may not reach remote ranks).
        let chunk = comm.all_gather(chunk as u64)[0] as usize;
        comm.abort_on_panic();
        Ok(Self {
            rank: comm.rank(),
            size: comm.size(),
            chunk,
            comm: Comm::Mpi(comm),
        })
    }

    /// This process's rank, 0-based.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Rank 0: the one that writes files and prints.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Whether more than one process trains.
    pub fn is_distributed(&self) -> bool {
        self.size > 1
    }

    /// Wait until every rank is here.
    pub fn barrier(&self) {
        match &self.comm {
            Comm::Alone => {}
            #[cfg(feature = "mpi")]
            Comm::Mpi(c) => c.barrier(),
        }
    }

    /// Element-wise sum of `buf` over all ranks, left in every rank's `buf`, in chunks of at
    /// most [`MAX_CHUNK`] elements.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn all_reduce_sum(&self, buf: &mut [f32]) {
        match &self.comm {
            Comm::Alone => {}
            #[cfg(feature = "mpi")]
            Comm::Mpi(c) => {
                for range in chunk_ranges(buf.len(), self.chunk) {
                    c.all_reduce_sum(&mut buf[range]);
                }
            }
        }
    }

    /// Rank 0's `buf` copied into every rank's `buf` (same length everywhere), in chunks.
    #[cfg_attr(not(feature = "mpi"), allow(unused_variables))]
    pub fn broadcast_from_root(&self, buf: &mut [f32]) {
        match &self.comm {
            Comm::Alone => {}
            #[cfg(feature = "mpi")]
            Comm::Mpi(c) => {
                for range in chunk_ranges(buf.len(), self.chunk) {
                    c.broadcast(&mut buf[range]);
                }
            }
        }
    }

    /// Every rank's `value`, indexed by rank.
    pub fn all_gather(&self, value: u64) -> Vec<u64> {
        match &self.comm {
            Comm::Alone => vec![value],
            #[cfg(feature = "mpi")]
            Comm::Mpi(c) => c.all_gather(value),
        }
    }

    /// End every rank of the job with `code` (MPI_Abort): a rank that fails must not leave the
    /// others waiting in a collective. Alone: exit with `code`.
    pub fn abort(&self, code: i32) -> ! {
        match &self.comm {
            Comm::Alone => std::process::exit(code),
            #[cfg(feature = "mpi")]
            Comm::Mpi(c) => c.abort(code),
        }
    }

    /// `rank R of N` for messages (empty when alone).
    pub fn describe(&self) -> String {
        if self.is_distributed() {
            format!("rank {} of {}", self.rank, self.size)
        } else {
            String::new()
        }
    }
}

/// Why a build without MPI refuses to run as one of several ranks, and the fix.
pub fn refusal(rank: usize, size: usize, var: &str) -> String {
    format!(
        "this train was built without MPI but was started as rank {rank} of {size} ({var} = \
         {size}): each rank would train alone and every rank would write the same run \
         directory. Rebuild with the MPI feature: cargo build --release --features \
         mixlab-train/mpi (needs Open MPI or MPICH and libclang; docs/MPI.md)"
    )
}

/// `0..len` in consecutive ranges of at most `max` elements (none for an empty buffer).
pub fn chunk_ranges(len: usize, max: usize) -> Vec<Range<usize>> {
    let max = max.max(1);
    (0..len.div_ceil(max))
        .map(|i| i * max..((i + 1) * max).min(len))
        .collect()
}

#[cfg(feature = "mpi")]
mod mpi_comm {
    //! The MPI calls, through the `mpi` crate. Only the main thread calls MPI (`Funneled`).

    use anyhow::{Result, bail};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    pub struct MpiComm {
        /// Finalises MPI when dropped, after everything else.
        _universe: Universe,
        world: SimpleCommunicator,
    }

    impl MpiComm {
        pub fn init() -> Result<Self> {
            let Some((universe, _threading)) =
                mpi::initialize_with_threading(mpi::Threading::Funneled)
            else {
                bail!("MPI was initialised twice in this process");
            };
            let world = universe.world();
            Ok(Self {
                _universe: universe,
                world,
            })
        }

        pub fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        pub fn size(&self) -> usize {
            self.world.size() as usize
        }

        pub fn barrier(&self) {
            self.world.barrier();
        }

        pub fn all_reduce_sum(&self, buf: &mut [f32]) {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }

        pub fn broadcast(&self, buf: &mut [f32]) {
            self.world.process_at_rank(0).broadcast_into(buf);
        }

        pub fn all_gather(&self, value: u64) -> Vec<u64> {
            let mut out = vec![0u64; self.size()];
            self.world.all_gather_into(&value, &mut out[..]);
            out
        }

        pub fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }

        /// Print `why` and end every rank.
        pub fn abort_with(&self, why: &str) -> ! {
            eprintln!("error (rank {} of {}): {why}", self.rank(), self.size());
            self.abort(1)
        }

        /// A panic on the main thread (the only one that calls MPI) ends every rank, after
        /// the usual message: the others may be waiting for this one in a collective.
        pub fn abort_on_panic(&self) {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                if std::thread::current().name() == Some("main") {
                    SimpleCommunicator::world().abort(101);
                }
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_in_order_without_overlap() {
        for (len, max) in [(0, 4), (1, 4), (4, 4), (5, 4), (13, 4), (10, 1), (7, 100)] {
            let ranges = chunk_ranges(len, max);
            let mut next = 0;
            for r in &ranges {
                assert_eq!(r.start, next, "len {len} max {max}: {ranges:?}");
                assert!(r.end > r.start && r.end - r.start <= max, "{ranges:?}");
                next = r.end;
            }
            assert_eq!(next, len, "len {len} max {max}: {ranges:?}");
            assert_eq!(ranges.len(), len.div_ceil(max));
        }
    }

    #[test]
    fn launchers_are_recognised_by_their_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(launched_as(env(&[])), None);
        assert_eq!(
            launched_as(env(&[
                ("OMPI_COMM_WORLD_SIZE", "4"),
                ("OMPI_COMM_WORLD_RANK", "2")
            ])),
            Some((2, 4, "OMPI_COMM_WORLD_SIZE"))
        );
        assert_eq!(
            launched_as(env(&[("PMI_SIZE", "2"), ("PMI_RANK", "1")])),
            Some((1, 2, "PMI_SIZE"))
        );
        assert_eq!(
            launched_as(env(&[("SLURM_STEP_NUM_TASKS", "8"), ("SLURM_PROCID", "7")])),
            Some((7, 8, "SLURM_STEP_NUM_TASKS"))
        );
        // An sbatch script's own shell (no step yet) and a half-set pair are not launches.
        assert_eq!(launched_as(env(&[("SLURM_NTASKS", "8")])), None);
        assert_eq!(launched_as(env(&[("PMI_SIZE", "2")])), None);
        let why = refusal(1, 2, "OMPI_COMM_WORLD_SIZE");
        assert!(why.contains("rank 1 of 2") && why.contains("--features mixlab-train/mpi"));
    }
}
