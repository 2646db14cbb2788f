//! Bit-exactness against a naive i64 product, for every kernel this CPU has.

use super::*;

/// Deterministic bytes (an LCG's high bits).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }
    fn next(&mut self) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as u32
    }
    fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
    /// A zero point in range, extreme values half of the time.
    fn zp(&mut self, signed: bool) -> i32 {
        let (lo, hi) = if signed { (-128, 127) } else { (0, 255) };
        match self.below(6) {
            0 => lo,
            1 => hi,
            2 => 0,
            _ => lo + self.below(256) as i32,
        }
    }
}

fn available() -> Vec<Int8Kernel> {
    Int8Kernel::ALL
        .into_iter()
        .filter(|k| k.available())
        .collect()
}

/// One product with everything stored.
struct Case {
    m: usize,
    n: usize,
    k: usize,
    a: Vec<u8>,
    a_signed: bool,
    lda: usize,
    a_zp: i32,
    b: Vec<u8>,
    b_signed: bool,
    ldb: usize,
    transposed: bool,
    b_zp: Vec<i32>,
    ldc: usize,
}

/// What C holds where nothing may be written.
const SENTINEL: i32 = 0x5A5A_5A5A;

impl Case {
    /// Random operands; `pad` extra elements per row of A, B and C; `per_col` zero points.
    #[allow(clippy::too_many_arguments)]
    fn random(
        rng: &mut Rng,
        (m, n, k): (usize, usize, usize),
        a_signed: bool,
        b_signed: bool,
        transposed: bool,
        per_col: bool,
        pad: usize,
    ) -> Case {
        let lda = k + pad;
        let ldb = if transposed { k } else { n } + pad;
        let b_rows = if transposed { n } else { k };
        let b_zp = (0..if per_col { n } else { 1 })
            .map(|_| rng.zp(b_signed))
            .collect();
        Case {
            m,
            n,
            k,
            a: rng.bytes(m * lda),
            a_signed,
            lda,
            a_zp: rng.zp(a_signed),
            b: rng.bytes(b_rows * ldb),
            b_signed,
            ldb,
            transposed,
            b_zp,
            ldc: n + pad,
        }
    }

    fn int_a(&self) -> IntA<'_> {
        IntA {
            a: &self.a,
            signed: self.a_signed,
            lda: self.lda,
            zp: self.a_zp,
        }
    }

    fn pack(&self, kind: Int8Kernel) -> Result<PackedB, String> {
        pack_b_with(
            kind,
            &self.b,
            self.b_signed,
            self.k,
            self.n,
            self.ldb,
            self.transposed,
            &self.b_zp,
        )
    }

    /// Element `(i, j)` of the exact product, reduced to i32 as two's complement.
    fn reference(&self, i: usize, j: usize) -> i32 {
        let val = |x: u8, signed: bool| {
            if signed {
                i64::from(x as i8)
            } else {
                i64::from(x)
            }
        };
        let zb = i64::from(self.b_zp[if self.b_zp.len() == 1 { 0 } else { j }]);
        let mut s = 0i64;
        for q in 0..self.k {
            let a = val(self.a[i * self.lda + q], self.a_signed) - i64::from(self.a_zp);
            let b = if self.transposed {
                self.b[j * self.ldb + q]
            } else {
                self.b[q * self.ldb + j]
            };
            s += a * (val(b, self.b_signed) - zb);
        }
        s as i32
    }

    /// The exact product, `m x n`.
    fn expected(&self) -> Vec<i32> {
        (0..self.m * self.n)
            .map(|e| self.reference(e / self.n, e % self.n))
            .collect()
    }

    /// Runs rows `rows` with every available kernel and checks them against the reference,
    /// and that nothing else in C changed.
    fn check(&self, rows: Range<usize>) {
        let want = self.expected();
        for kind in available() {
            self.check_with(kind, rows.clone(), &want);
        }
    }

    fn check_with(&self, kind: Int8Kernel, rows: Range<usize>, want: &[i32]) {
        let packed = self.pack(kind).unwrap();
        assert_eq!(packed.kernel(), kind);
        let mut c = vec![SENTINEL; self.m * self.ldc];
        gemm_rows_mut(
            &self.int_a(),
            self.m,
            rows.clone(),
            &packed,
            &mut c,
            self.ldc,
        )
        .unwrap();
        for i in 0..self.m {
            for j in 0..self.ldc {
                let got = c[i * self.ldc + j];
                let want = if rows.contains(&i) && j < self.n {
                    want[i * self.n + j]
                } else {
                    SENTINEL
                };
                assert_eq!(
                    got,
                    want,
                    "{kind:?} ({i}, {j}) of {}x{}x{} a_signed {} b_signed {} transposed {} \
                     a_zp {} b_zp {:?} lda {} ldb {} ldc {} rows {rows:?}",
                    self.m,
                    self.n,
                    self.k,
                    self.a_signed,
                    self.b_signed,
                    self.transposed,
                    self.a_zp,
                    &self.b_zp[..self.b_zp.len().min(4)],
                    self.lda,
                    self.ldb,
                    self.ldc
                );
            }
        }
    }
}

/// Every (a_signed, b_signed, transposed) combination.
fn variants() -> impl Iterator<Item = (bool, bool, bool)> {
    (0..8).map(|v| (v & 1 != 0, v & 2 != 0, v & 4 != 0))
}

#[test]
fn kernels_detected() {
    assert!(Int8Kernel::Portable.available());
    assert!(Int8Kernel::best().available());
    eprintln!("int8 kernels available: {:?}", available());
}

#[test]
fn geometry_invariants() {
    for kind in Int8Kernel::ALL {
        let g = kind.geometry();
        assert!(
            g.mr >= 1 && g.mr <= 8,
            "{kind:?}: SIMD A packing takes <= 8 rows"
        );
        assert!(
            g.mc.is_multiple_of(g.mr) && g.mc <= drive::MAX_MC,
            "{kind:?}"
        );
        assert!(
            g.kc.is_multiple_of(4) && g.nr.is_multiple_of(g.lanes),
            "{kind:?}"
        );
    }
    for k in [0, 1, 3, 4, 5, 511, 512, 513, 1025, 1500, 2049, 100_000] {
        let kc = pack::depth_block(k, 512);
        assert!(kc.is_multiple_of(4) && (4..=512).contains(&kc), "{k}: {kc}");
        assert!(k.div_ceil(kc).max(1) == k.div_ceil(512).max(1), "{k}: {kc}");
    }
}

/// The SIMD packing of A's micro-panels (x86) against packing every lane in plain Rust.
#[test]
fn a_packing_matches_scalar() {
    let mut rng = Rng::new(8);
    for h in 1..=8 {
        for kc in [1, 2, 3, 4, 15, 16, 17, 31, 32, 33, 64, 100, 257] {
            for mode in [
                pack::AMode::Vnni { flip: 0 },
                pack::AMode::Vnni { flip: 0x80 },
                pack::AMode::I16 {
                    signed: false,
                    zp: 255,
                },
                pack::AMode::I16 {
                    signed: true,
                    zp: -128,
                },
                pack::AMode::I16 {
                    signed: true,
                    zp: 5,
                },
            ] {
                let lda = kc + 3;
                let a = rng.bytes(h * lda + 5);
                let src = pack::ABlock {
                    a: &a,
                    lda,
                    rows: 0..h,
                    pc: 2.min(lda - kc),
                    kc,
                    mr: 8,
                };
                let groups = kc.div_ceil(mode.group());
                let mut got = vec![0xEEu8; groups * h * 4];
                let mut got_sums = vec![7; h];
                pack::pack_a(&src, mode, &mut got, &mut got_sums);
                let mut want = vec![0xEEu8; groups * h * 4];
                let mut want_sums = vec![0; h];
                for (i, s) in want_sums.iter_mut().enumerate() {
                    let row = &a[i * lda + src.pc..][..kc];
                    *s = pack::pack_row(row, i, h, mode, &mut want);
                }
                assert_eq!(got, want, "{mode:?} h {h} kc {kc}");
                assert_eq!(got_sums, want_sums, "{mode:?} h {h} kc {kc}");
            }
        }
    }
}

#[test]
fn every_size_up_to_37() {
    let mut rng = Rng::new(1);
    for (a_signed, b_signed, transposed) in variants() {
        // Each dimension through 1..=37 with the others odd, then random triples.
        let mut shapes: Vec<_> = (1..=37)
            .flat_map(|x| [(x, 13, 11), (7, x, 9), (5, 19, x)])
            .collect();
        shapes.extend((0..60).map(|_| (1 + rng.below(37), 1 + rng.below(37), 1 + rng.below(37))));
        for (s, &shape) in shapes.iter().enumerate() {
            let per_col = s % 2 == 1;
            let pad = if s % 3 == 0 { 0 } else { 1 + s % 5 };
            let case = Case::random(
                &mut rng, shape, a_signed, b_signed, transposed, per_col, pad,
            );
            case.check(0..shape.0);
        }
    }
}

/// u8 A with B's zero point 0 and whole 4-byte groups: the AVX-512 VNNI kernel reads A in
/// place instead of packing it (`drive`). Row strides, tails of rows and columns, several row
/// and depth blocks, A's zero point at its extremes, partial row ranges.
#[test]
fn a_read_in_place() {
    let mut rng = Rng::new(9);
    let shapes = [
        (1, 16, 4),
        (7, 33, 8),
        (8, 48, 64),
        (13, 100, 516),
        (200, 50, 1028),
        (9, 5, 2048),
    ];
    for (s, &(m, n, k)) in shapes.iter().enumerate() {
        for (v, (pad, b_signed, transposed)) in
            [(0, true, true), (3, true, false), (1, false, true)]
                .into_iter()
                .enumerate()
        {
            let mut case =
                Case::random(&mut rng, (m, n, k), false, b_signed, transposed, false, pad);
            case.b_zp = vec![0];
            case.a_zp = [0, 255, 128][(s + v) % 3];
            case.check(0..m);
            case.check(m / 2..m);
        }
    }
}

#[test]
fn large_and_blocked() {
    let mut rng = Rng::new(2);
    // Several row blocks, column panels with tails, and several depth blocks.
    let shapes = [
        (255, 513, 300),
        (70, 100, 1500),
        (200, 33, 2049),
        (1, 700, 1030),
    ];
    for (s, &shape) in shapes.iter().enumerate() {
        for (v, (a_signed, b_signed, transposed)) in variants().enumerate() {
            // Half of the variants per shape (two for the largest) keeps this quick.
            if (v + s) % 2 == 1 || (s == 0 && v % 3 != 0) {
                continue;
            }
            let case = Case::random(
                &mut rng,
                shape,
                a_signed,
                b_signed,
                transposed,
                v % 4 < 2,
                3,
            );
            case.check(0..shape.0);
        }
    }
}

#[test]
fn extreme_zero_points() {
    let mut rng = Rng::new(3);
    for (a_signed, b_signed, transposed) in variants() {
        let (alo, ahi) = if a_signed { (-128, 127) } else { (0, 255) };
        let (blo, bhi) = if b_signed { (-128, 127) } else { (0, 255) };
        for a_zp in [alo, 0, ahi] {
            for b_zp in [vec![blo], vec![0], vec![bhi], vec![blo, bhi, 0, bhi, blo]] {
                let mut case = Case::random(
                    &mut rng,
                    (9, 5, 23),
                    a_signed,
                    b_signed,
                    transposed,
                    false,
                    2,
                );
                case.a_zp = a_zp;
                case.b_zp = b_zp;
                case.check(0..9);
                // Operands at their own extremes too.
                case.a.fill(if a_signed { 0x80 } else { 0xFF });
                case.b.fill(if b_signed { 0x7F } else { 0 });
                case.check(0..9);
            }
        }
    }
}

#[test]
fn row_ranges_leave_other_rows() {
    let mut rng = Rng::new(4);
    for (a_signed, b_signed, transposed) in variants() {
        let case = Case::random(
            &mut rng,
            (11, 37, 29),
            a_signed,
            b_signed,
            transposed,
            true,
            4,
        );
        for rows in [3..7, 0..1, 10..11, 5..5, 0..11] {
            case.check(rows);
        }
    }
}

#[test]
fn exact_up_to_exact_max_k_and_wraps_beyond() {
    for k in [EXACT_MAX_K, EXACT_MAX_K + 1, 40_000] {
        // Largest magnitude: u8 255 against zero point 0, and B at the far end from its
        // zero point; positive and negative sums.
        let mut rng = Rng::new(5);
        let mut case = Case::random(&mut rng, (3, 18, k), false, false, false, false, 0);
        case.a.fill(255);
        case.a_zp = 0;
        for (j, col) in (0..case.n).zip([0u8, 255].iter().cycle()) {
            for q in 0..k {
                case.b[q * case.ldb + j] = *col;
            }
        }
        case.b_zp = (0..case.n)
            .map(|j| if j % 2 == 0 { 255 } else { 0 })
            .collect();
        case.check(0..3);
        let s = (0..case.k)
            .map(|q| 255i64 * (i64::from(case.b[q * case.ldb]) - 255))
            .sum::<i64>();
        assert_eq!(s == i64::from(s as i32), k <= EXACT_MAX_K);
    }
}

#[test]
fn empty_dimensions() {
    for kind in available() {
        let a = IntA {
            a: &[],
            signed: false,
            lda: 0,
            zp: 0,
        };
        // k == 0: C is all zeros.
        let packed = pack_b_with(kind, &[], true, 0, 3, 0, false, &[0]).unwrap();
        let mut c = vec![SENTINEL; 2 * 4];
        gemm_rows_mut(&a, 2, 0..2, &packed, &mut c, 4).unwrap();
        assert_eq!(c, [0, 0, 0, SENTINEL, 0, 0, 0, SENTINEL]);
        // m == 0 and n == 0: nothing to do, nothing read.
        let packed = pack_b_with(kind, &[1; 6], false, 2, 3, 3, false, &[0]).unwrap();
        gemm_rows_mut(&a, 0, 0..0, &packed, &mut [], 3).unwrap();
        let packed = pack_b_with(kind, &[], false, 2, 0, 0, false, &[7]).unwrap();
        let a2 = IntA {
            a: &[1, 2, 3, 4],
            signed: false,
            lda: 2,
            zp: 0,
        };
        gemm_rows_mut(&a2, 2, 0..2, &packed, &mut [], 0).unwrap();
    }
}

#[test]
fn gemm_convenience_and_parallel_rows() {
    let mut rng = Rng::new(6);
    let case = Case::random(&mut rng, (40, 50, 60), true, false, true, true, 2);
    let mut c = vec![SENTINEL; case.m * case.ldc];
    gemm(
        &case.int_a(),
        case.m,
        case.k,
        case.n,
        &case.b,
        case.b_signed,
        case.ldb,
        case.transposed,
        &case.b_zp,
        &mut c,
        case.ldc,
    )
    .unwrap();
    let want: Vec<i32> = (0..case.m * case.ldc)
        .map(|e| {
            let (i, j) = (e / case.ldc, e % case.ldc);
            if j < case.n {
                case.reference(i, j)
            } else {
                SENTINEL
            }
        })
        .collect();
    assert_eq!(c, want);

    // Two threads, disjoint row ranges of one C.
    let packed = case.pack(Int8Kernel::best()).unwrap();
    let mut c2 = vec![SENTINEL; case.m * case.ldc];
    let shared = IntC::new(&mut c2, case.ldc);
    let a = case.int_a();
    std::thread::scope(|s| {
        for rows in [0..17, 17..40] {
            let (a, packed) = (&a, &packed);
            s.spawn(move || {
                // SAFETY: the two ranges are disjoint.
                unsafe { gemm_rows(a, case.m, rows, packed, shared) }.unwrap()
            });
        }
    });
    assert_eq!(c2, want);
}

#[test]
fn bad_arguments_are_errors() {
    let b = [0u8; 12];
    let p = |b: &[u8], signed, k, n, ldb, tr, zp: &[i32]| {
        pack_b_with(Int8Kernel::Portable, b, signed, k, n, ldb, tr, zp).err()
    };
    // B of 3 x 4, stride 4: 12 bytes.
    assert!(p(&b, false, 3, 4, 4, false, &[0]).is_none());
    assert!(p(&b[..11], false, 3, 4, 4, false, &[0]).is_some());
    assert!(p(&b, false, 3, 4, 5, false, &[0]).is_some()); // needs 14
    assert!(p(&b, false, 3, 4, 3, false, &[0]).is_some()); // stride < row
    assert!(p(&b, false, 4, 3, 4, true, &[0]).is_none()); // transposed: 3 rows of 4
    assert!(p(&b, false, 4, 3, 3, true, &[0]).is_some());
    assert!(p(&b, false, 3, 4, 4, false, &[0, 0]).is_some()); // zp length
    assert!(p(&b, false, 3, 4, 4, false, &[]).is_some());
    assert!(p(&b, false, 3, 4, 4, false, &[0, 1, 2, 3]).is_none());
    assert!(p(&b, false, 3, 4, 4, false, &[256]).is_some());
    assert!(p(&b, false, 3, 4, 4, false, &[-1]).is_some());
    assert!(p(&b, true, 3, 4, 4, false, &[128]).is_some());
    assert!(p(&b, true, 3, 4, 4, false, &[-129]).is_some());
    assert!(p(&b, true, 3, 4, 4, false, &[-128]).is_none());
    assert!(p(&b, false, usize::MAX / 2, 4, 4, false, &[0]).is_some()); // size overflow
    let huge = p(&b, false, 1, usize::MAX, usize::MAX, false, &[0]);
    assert!(huge.is_some(), "{huge:?}");

    let packed = pack_b_with(Int8Kernel::best(), &b, false, 3, 4, 4, false, &[0]).unwrap();
    let a = [0u8; 6]; // 2 x 3
    let int_a = |a: &'static [u8], lda, zp, signed| IntA { a, signed, lda, zp };
    let run = |ia: &IntA<'_>, m, rows: Range<usize>, c: &mut [i32], ldc| {
        gemm_rows_mut(ia, m, rows, &packed, c, ldc).err()
    };
    static A: [u8; 6] = [0; 6];
    let mut c = [0i32; 8];
    assert!(run(&int_a(&A, 3, 0, false), 2, 0..2, &mut c, 4).is_none());
    assert!(run(&int_a(&A[..5], 3, 0, false), 2, 0..2, &mut c, 4).is_some());
    assert!(run(&int_a(&A, 2, 0, false), 2, 0..2, &mut c, 4).is_some()); // lda < k
    assert!(run(&int_a(&A, 3, 256, false), 2, 0..2, &mut c, 4).is_some());
    assert!(run(&int_a(&A, 3, 128, true), 2, 0..2, &mut c, 4).is_some());
    assert!(run(&int_a(&A, 3, -128, true), 2, 0..2, &mut c, 4).is_none());
    assert!(run(&int_a(&A, 3, 0, false), 2, 0..2, &mut c[..7], 4).is_some());
    assert!(run(&int_a(&A, 3, 0, false), 2, 0..2, &mut c, 3).is_some()); // ldc < n
    assert!(run(&int_a(&A, 3, 0, false), 2, 0..3, &mut c, 4).is_some()); // rows > m
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 2..1;
    assert!(run(&int_a(&A, 3, 0, false), 2, backwards, &mut c, 4).is_some());
    let _ = a;
}

/// GOP/s (2 m n k per product) of each kernel on 512 x 512 x 512, single thread, B packed
/// beforehand. Run with `--release --ignored --nocapture`; prints, asserts nothing.
#[test]
#[ignore]
fn speed_512() {
    let (m, n, k) = (512, 512, 512);
    let mut rng = Rng::new(7);
    for kind in available() {
        for (a_signed, b_signed) in [(false, true), (true, false)] {
            let case = Case::random(&mut rng, (m, n, k), a_signed, b_signed, false, false, 0);
            let t0 = std::time::Instant::now();
            let packed = case.pack(kind).unwrap();
            let pack_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut c = vec![0i32; m * n];
            let mut best = f64::INFINITY;
            let reps = if kind == Int8Kernel::Portable { 3 } else { 20 };
            for _ in 0..reps {
                let t = std::time::Instant::now();
                gemm_rows_mut(&case.int_a(), m, 0..m, &packed, &mut c, n).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            eprintln!(
                "int8 gemm {kind:?} a_signed {a_signed} b_signed {b_signed} {m}x{n}x{k}: \
                 {:.1} GOP/s ({:.3} ms; packing B {pack_ms:.2} ms)",
                2.0 * (m * n * k) as f64 / best / 1e9,
                best * 1e3
            );
        }
    }
}

/// The parallel split gives whole register tiles, covers the rows, keeps deep products in
/// tasks of many rows (one-row tasks stream all of B per row: the bug this guards), splits
/// evenly over the threads when there is work for them, and leaves tiny products whole.
#[test]
fn rows_per_task_keeps_tiles_whole_and_deep_products_in_blocks() {
    for kind in available() {
        let mr = kind.geometry().mr;
        let pack = |k: usize, n: usize| {
            pack_b_with(kind, &vec![1u8; k * n], true, k, n, n, false, &[0]).unwrap()
        };
        // ResNet-50 3x3 at 28x28: m = 784, k = 1152, n = 128.
        let deep = pack(1152, 128);
        for threads in [1, 2, 4, 16] {
            let rows = deep.rows_per_task(784, threads);
            assert!(
                (1..=784).contains(&rows),
                "{kind:?} threads {threads}: {rows}"
            );
            assert!(
                rows == 784 || rows.is_multiple_of(mr),
                "{kind:?}: {rows} rows, mr {mr}"
            );
            let tasks = 784usize.div_ceil(rows);
            assert!(rows >= mr.min(784), "{kind:?}: {rows} rows");
            // Rounding to whole tiles may cost a task or two, not a thread's share.
            if threads > 1 {
                let want = threads.min(784 / mr) * 3 / 4;
                assert!(
                    tasks >= want,
                    "{kind:?}: {tasks} tasks for {threads} threads"
                );
            }
        }
        let rows = deep.rows_per_task(784, 2);
        assert!(
            rows >= 8 * mr,
            "{kind:?}: deep product cut into {rows}-row tasks"
        );
        // A product too small to pay for a second task stays whole.
        let tiny = pack(8, 8);
        assert_eq!(tiny.rows_per_task(12, 2), 12);
        assert_eq!(tiny.rows_per_task(0, 2), 1);
    }
}

/// The requantizing output stage (`gemm_block_requant`) gives, for every kernel, exactly
/// `requant_byte` of the exact sum plus the bias, and writes nothing outside its rows and
/// columns: one and several depth blocks, edge tiles, A read in place and packed, per-column
/// zero points, u8 and i8 results, and multipliers that saturate, vanish or are infinite
/// (an infinite one times a zero sum is NaN, which gives the lower bound).
#[test]
fn requantized_tiles_match_requant_byte() {
    let mut rng = Rng::new(9);
    let shapes = [
        (1, 1, 4),
        (9, 17, 16),
        (37, 96, 16),
        (8, 48, 24),
        (25, 50, 32),
        (70, 33, 515),
        (200, 64, 1100),
        // No depth: every sum 0, the bias alone requantized.
        (5, 20, 0),
    ];
    const BYTE_SENTINEL: u8 = 0xA5;
    for (s, &(m, n, k)) in shapes.iter().enumerate() {
        for (v, (a_signed, b_signed, transposed)) in variants().enumerate() {
            if (v + s) % 3 != 0 && v != 0 {
                continue;
            }
            let mut case = Case::random(
                &mut rng,
                (m, n, k),
                a_signed,
                b_signed,
                transposed,
                v % 2 == 1,
                2,
            );
            if v == 0 {
                // u8 A with B's zero point 0: the AVX-512 kernel reads A in place.
                case.b_zp = vec![0];
            }
            let bias: Vec<i32> = (0..n).map(|_| rng.below(20001) as i32 - 10000).collect();
            let mult: Vec<f32> = (0..n)
                .map(|j| match j % 11 {
                    3 => 0.0,
                    7 => f32::INFINITY,
                    5 => 1.0,
                    _ => (rng.below(1000) as f32 + 1.0) * 1e-6,
                })
                .collect();
            let signed_out = s % 2 == 1;
            let zp = rng.zp(signed_out);
            let (lo, hi) = if signed_out { (-128, 127) } else { (0, 255) };
            let rq = Requant {
                bias: &bias,
                mult: &mult,
                zp,
                lo: (lo - zp) as f32,
                hi: (hi - zp) as f32,
            };
            let want = case.expected();
            let rows = if m > 3 { 1..m - 1 } else { 0..m };
            for kind in available() {
                let packed = case.pack(kind).unwrap();
                let mut c = vec![BYTE_SENTINEL; m * case.ldc];
                // All columns at once, or (every other shape) in two blocks split at a
                // micro-panel, as tasks of a product of few rows run them.
                let nr = kind.geometry().nr;
                let split = if s % 2 == 0 && n > nr { nr } else { n };
                let splits = [0..split, split..n];
                let shared = ByteC::new(&mut c, case.ldc);
                for cols in splits {
                    // SAFETY: the blocks are disjoint and `c` is borrowed for the calls alone.
                    unsafe {
                        gemm_block_requant(
                            &case.int_a(),
                            m,
                            rows.clone(),
                            cols,
                            &packed,
                            shared,
                            &rq,
                        )
                    }
                    .unwrap();
                }
                for i in 0..m {
                    for j in 0..case.ldc {
                        let got = c[i * case.ldc + j];
                        let expect = if rows.contains(&i) && j < n {
                            let acc = want[i * n + j].wrapping_add(bias[j]);
                            opreg_sdk::numeric::requant_byte(acc, mult[j], zp, rq.lo, rq.hi)
                        } else {
                            BYTE_SENTINEL
                        };
                        assert_eq!(
                            got, expect,
                            "{kind:?} ({i}, {j}) of {m}x{n}x{k} variant {v} zp {zp} \
                             signed out {signed_out}"
                        );
                    }
                }
            }
        }
    }
}

/// `gemm_block` computes exactly its columns (whole micro-panels) of its rows, for every
/// kernel, leaves the rest of C alone, and refuses columns that split a micro-panel.
#[test]
fn column_blocks_compute_their_columns_only() {
    let mut rng = Rng::new(11);
    for (s, &(m, n, k)) in [(5, 150, 40), (49, 97, 600), (12, 48, 8)]
        .iter()
        .enumerate()
    {
        let case = Case::random(&mut rng, (m, n, k), s == 1, s != 1, s == 2, s == 0, 1);
        let want = case.expected();
        for kind in available() {
            let packed = case.pack(kind).unwrap();
            let nr = kind.geometry().nr;
            let cols = nr.min(n)..n;
            let mut c = vec![SENTINEL; m * case.ldc];
            // SAFETY: `c` is borrowed for the call alone.
            unsafe {
                gemm_block(
                    &case.int_a(),
                    m,
                    0..m,
                    cols.clone(),
                    &packed,
                    IntC::new(&mut c, case.ldc),
                )
            }
            .unwrap();
            for i in 0..m {
                for j in 0..case.ldc {
                    let expect = if cols.contains(&j) {
                        want[i * n + j]
                    } else {
                        SENTINEL
                    };
                    assert_eq!(
                        c[i * case.ldc + j],
                        expect,
                        "{kind:?} ({i}, {j}) of {m}x{n}x{k}"
                    );
                }
            }
            if n > 1 {
                // SAFETY: as above.
                let split = unsafe {
                    gemm_block(
                        &case.int_a(),
                        m,
                        0..m,
                        1..n,
                        &packed,
                        IntC::new(&mut c, case.ldc),
                    )
                };
                assert!(
                    split.is_err(),
                    "{kind:?}: columns from 1 split a micro-panel"
                );
            }
        }
    }
}

/// Products of few rows split their columns over the threads (whole micro-panels); products
/// of many rows, or too little work, split rows only.
#[test]
fn few_rows_split_columns() {
    let mut rng = Rng::new(12);
    let big = Case::random(&mut rng, (1, 1280, 320), false, true, false, false, 0);
    let kind = Int8Kernel::best();
    let packed = big.pack(kind).unwrap();
    let nr = kind.geometry().nr;
    // MobileNetV2's last 1x1 layer at 7x7: 49 rows.
    let (rows, cols) = packed.tasks(49, 2);
    assert_eq!(rows, 49);
    assert!(cols % nr == 0 && 1280usize.div_ceil(cols) >= 2, "{cols}");
    // Many rows: rows only.
    let (rows, cols) = packed.tasks(3136, 2);
    assert!(rows < 3136 && cols == 1280, "{rows} {cols}");
    // One thread: one task.
    assert_eq!(packed.tasks(49, 1).1, 1280);
    // Too little work to split: 4 rows of a 16 x 48 product.
    let small = Case::random(&mut rng, (1, 48, 16), false, true, false, false, 0);
    let p = small.pack(kind).unwrap();
    assert_eq!(p.tasks(4, 2).1, 48);
}
