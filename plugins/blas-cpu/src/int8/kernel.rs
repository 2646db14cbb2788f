//! The integer micro-kernels: which ones this CPU runs, and each one's blocking.

use std::sync::OnceLock;

/// An integer micro-kernel, best first in [`Int8Kernel::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Int8Kernel {
    /// AVX-512 VNNI (`avx512f` + `avx512bw` + `avx512vnni`), zmm, u8 x s8 layout.
    Avx512Vnni,
    /// AVX-VNNI (`avxvnni` + `avx2`), ymm, u8 x s8 layout.
    AvxVnni,
    /// AVX2 `vpmaddwd` on zero-point-adjusted i16.
    Avx2,
    /// Plain Rust on zero-point-adjusted i16.
    Portable,
}

/// Blocking and layout of one kernel.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    /// Rows of the register tile.
    pub mr: usize,
    /// Columns of the register tile (a multiple of `lanes`).
    pub nr: usize,
    /// Columns per vector register (the granularity of the last micro-panel's width).
    pub lanes: usize,
    /// Rows of A packed per block (a multiple of `mr`).
    pub mc: usize,
    /// Depth block (a multiple of 4).
    pub kc: usize,
    /// Whether the layout is u8 A x s8 B in groups of 4 (else i16 in groups of 2).
    pub vnni: bool,
}

impl Geometry {
    /// k values per lane.
    pub fn group(&self) -> usize {
        if self.vnni {
            4
        } else {
            2
        }
    }
}

impl Int8Kernel {
    /// Every kernel, best first.
    pub(crate) const ALL: [Int8Kernel; 4] = [
        Int8Kernel::Avx512Vnni,
        Int8Kernel::AvxVnni,
        Int8Kernel::Avx2,
        Int8Kernel::Portable,
    ];

    /// Whether this CPU runs the kernel.
    pub(crate) fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::AvxVnni => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Int8Kernel::Avx512Vnni | Int8Kernel::AvxVnni | Int8Kernel::Avx2 => false,
            Int8Kernel::Portable => true,
        }
    }

    /// Whether the kernel can read u8 A in place (row stride apart) instead of a packed
    /// micro-panel: the AVX-512 VNNI one (see `drive`).
    pub(super) fn reads_a_in_place(self) -> bool {
        matches!(self, Int8Kernel::Avx512Vnni)
    }

    /// The best kernel for this CPU, detected once per process.
    pub(crate) fn best() -> Int8Kernel {
        // A plain static (no destructor, no thread-local): it does not pin the library.
        static BEST: OnceLock<Int8Kernel> = OnceLock::new();
        *BEST.get_or_init(|| {
            Int8Kernel::ALL
                .into_iter()
                .find(|k| k.available())
                .unwrap_or(Int8Kernel::Portable)
        })
    }

    /// The kernel's blocking. Tiles: 8x48 (24 zmm accumulators) for AVX-512 VNNI, 6x16 (12
    /// ymm) for the ymm kernels; depth blocks keep a B micro-panel within L1 (<= 24 KiB) and
    /// an A block within L2.
    pub(super) fn geometry(self) -> Geometry {
        match self {
            Int8Kernel::Avx512Vnni => Geometry {
                mr: 8,
                nr: 48,
                lanes: 16,
                mc: 192,
                kc: 512,
                vnni: true,
            },
            Int8Kernel::AvxVnni => Geometry {
                mr: 6,
                nr: 16,
                lanes: 8,
                mc: 144,
                kc: 1024,
                vnni: true,
            },
            Int8Kernel::Avx2 => Geometry {
                mr: 6,
                nr: 16,
                lanes: 8,
                mc: 144,
                kc: 512,
                vnni: false,
            },
            Int8Kernel::Portable => Geometry {
                mr: 4,
                nr: 16,
                lanes: 16,
                mc: 64,
                kc: 256,
                vnni: false,
            },
        }
    }
}
