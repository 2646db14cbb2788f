//! The portable tile kernel (any CPU) on the i16 layout.

use super::drive::Tile;

/// Portable tile for the i16 layout (4 x 16 at most; one 16-column vector).
///
/// # Safety
/// `t` describes packed micro-panels of `t.groups` groups for `mr` rows and 16 columns, and a
/// writable `mr x t.nr` tile of C.
pub(super) unsafe fn tile_portable(t: &Tile, mr: usize, nv: usize) -> bool {
    if nv != 1 {
        return false;
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match mr {
            1 => portable::<1>(t),
            2 => portable::<2>(t),
            3 => portable::<3>(t),
            4 => portable::<4>(t),
            _ => return false,
        }
    }
    true
}

/// # Safety
/// As [`tile_portable`] with `mr == MR`.
unsafe fn portable<const MR: usize>(t: &Tile) {
    // SAFETY: the packed buffers are 64-byte aligned and panels start at multiples of 4
    // bytes, so the pointers are i16-aligned; the caller guarantees the lengths.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(t.a.cast::<i16>(), t.groups * MR * 2),
            std::slice::from_raw_parts(t.b.cast::<i16>(), t.groups * 16 * 2),
        )
    };
    let mut acc = [[0i32; 16]; MR];
    for (ga, gb) in a.chunks_exact(MR * 2).zip(b.chunks_exact(32)) {
        let gb: &[i16; 32] = gb.try_into().unwrap_or(&[0; 32]);
        for (row, x) in acc.iter_mut().zip(ga.chunks_exact(2)) {
            // The row's pair repeated against the 16 column pairs: a pairwise multiply-add
            // that LLVM vectorizes (partly, on the x86-64 baseline; this kernel only runs
            // where no SIMD kernel does).
            let mut xs = [0i16; 32];
            for p in xs.chunks_exact_mut(2) {
                p.copy_from_slice(x);
            }
            for (j, s) in row.iter_mut().enumerate() {
                // |x0 * y0 + x1 * y1| <= 2 * 255 * 255: only the running sum can wrap.
                let d = i32::from(xs[2 * j]) * i32::from(gb[2 * j])
                    + i32::from(xs[2 * j + 1]) * i32::from(gb[2 * j + 1]);
                *s = s.wrapping_add(d);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: row i < mr of the caller's tile, `nr` columns.
        let dst = unsafe { std::slice::from_raw_parts_mut(t.c.add(i * t.ldc), t.nr) };
        for (d, &s) in dst.iter_mut().zip(row) {
            *d = if t.first { s } else { d.wrapping_add(s) };
        }
    }
}
