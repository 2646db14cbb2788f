//! Memory planning: the values of a run live at planned offsets of one arena instead of one
//! heap allocation each, and arenas are kept between runs, so a steady-state run allocates
//! nothing per value (ONNX Runtime's memory patterns).
//!
//! Shapes often depend on the inputs (a symbolic batch), so the offsets are planned per set of
//! input shapes: the first run with new shapes allocates as usual and records each value's
//! size; from the second on, the plan's liveness (when each value is made and last read) and
//! those sizes give offsets, greedily by size (a value shares memory only with values whose
//! lifetimes do not overlap its own). A value whose size turns out different (data-dependent
//! operators) goes to the heap as before. Only values the run owns and drops are planned:
//! graph outputs leave the run, constants belong to the plan, and values made by control flow
//! or copies come from elsewhere.
//!
//! Graph outputs leave the run, so they cannot live in its arena; but a freshly allocated
//! output was zeroed (or, past glibc's mmap threshold, page-faulted in) on every run: a 38 MB
//! output at batch 8 cost 17 ms of a 21 ms run, against ONNX Runtime's 4.5 (its arena keeps
//! the memory). So the plan keeps a few blocks for them ([`OutputBlocks`]): a pattern records
//! the graph outputs' sizes, and a run places each in a block nothing else holds any more
//! (the tensor of an earlier request releases its block when dropped, e.g. after the reply is
//! sent). A block is zeroed once when allocated; a kernel that overwrites its output does not
//! zero it again.
//!
//! Soundness does not rest on the plan being right: a tensor placed in an arena holds the arena
//! (`PlannedBuf::keep`), and an arena is reused only when nothing else holds it.

// Sizes here come from models and requests: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use opreg_sdk::host::PlannedBuf;
use opreg_sdk::DType;
use std::{
    alloc::Layout,
    collections::HashMap,
    ptr::NonNull,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

/// Offsets are multiples of this (the alignment kernels get from a fresh allocation).
const ALIGN: usize = 64;
/// Blocks kept per plan for graph outputs (busy and idle), and their bytes at most: past
/// either, an output is allocated per run as without planning (an idle block of another size
/// is freed first to make room).
const MAX_OUTPUT_BLOCKS: usize = 8;
const MAX_OUTPUT_BYTES: usize = 256 << 20;
/// Input shapes remembered per plan; more are run without planning.
const MAX_PATTERNS: usize = 16;
/// Idle arenas kept per pattern (one per concurrent run).
const MAX_IDLE_ARENAS: usize = 4;
/// Idle arena bytes kept per plan, over all its patterns. Clients choose the input shapes, so
/// without a bound a few requests of different shapes would make a plan hold several of the
/// largest arenas a request may need; past it, an arena is freed after its run (that run's
/// shapes then allocate per run, as without planning).
const MAX_IDLE_BYTES: usize = 256 << 20;

/// The dtypes and shapes of a run's formal inputs: what a pattern is planned for.
pub(super) type ShapeKey = Vec<(DType, Vec<usize>)>;

/// One block of host memory values are placed in.
struct Arena {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain owned memory; which range is written by whom is governed by the plan.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    /// `len` zero bytes: a graph output's block, handed out "initialised, but meaningless" to
    /// kernels that overwrite their outputs, so never uninitialised.
    fn zeroed(len: usize) -> Option<Arena> {
        let layout = Layout::from_size_align(len.max(1), ALIGN).ok()?;
        // SAFETY: non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Arena { ptr, len })
    }

    fn new(len: usize) -> Option<Arena> {
        let layout = Layout::from_size_align(len.max(1), ALIGN).ok()?;
        // SAFETY: non-zero size. Not zeroed: every range is zeroed when an output takes it.
        let ptr = NonNull::new(unsafe { std::alloc::alloc(layout) })?;
        Some(Arena { ptr, len })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe {
            std::alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len.max(1), ALIGN),
            )
        }
    }
}

/// A concatenation whose inputs may be made inside its output: a kernel step `Concat` (the
/// plan's `step`), its `output` slot and its `inputs` slots in order, each read by that step
/// alone. Where a pattern's shapes make each input one contiguous run of the output (nothing
/// before the axis but ones: a batch-1 channel concat), the pattern places the inputs end to
/// end inside the output's range and the run skips the copy: SqueezeNet's eight concats
/// moved 0.9 MB each per image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Concat {
    pub step: usize,
    pub output: usize,
    pub inputs: Vec<usize>,
}

/// An output a kernel may write over one of its inputs ([`KernelDesc::aliases`]): kernel step
/// `step` reads slot `input` last and makes slot `output`. Where a pattern's sizes make the
/// two equal, it places both at one range (one value living from the input's making to the
/// output's last read), and the run hands the output to the kernel over the input's elements
/// ([`PlannedBuf::holds_input`]): ResNet-50's residual sums are written over their addends,
/// whose cache lines the product then reads once instead of reading Z and, for ownership, Y.
///
/// [`KernelDesc::aliases`]: opreg_sdk::KernelDesc::aliases
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Alias {
    pub step: usize,
    pub input: usize,
    pub output: usize,
}

/// Offsets for one set of input shapes, and its idle arenas.
struct Pattern {
    /// Per slot: `(offset, bytes)` in the arena.
    places: Vec<Option<(usize, usize)>>,
    /// The graph outputs' `(slot, bytes)` for these shapes (placed in [`OutputBlocks`]).
    outputs: Vec<(usize, usize)>,
    /// The concatenations placed in place for these shapes.
    in_place: Vec<Concat>,
    /// The aliases placed in one range for these shapes.
    aliased: Vec<Alias>,
    size: usize,
    idle: Mutex<Vec<Arc<Arena>>>,
    /// The plan's idle bytes over all its patterns (see [`MAX_IDLE_BYTES`]).
    idle_bytes: Arc<AtomicUsize>,
}

/// The memory plan of one compiled graph: which values may be planned (their lifetimes in
/// step positions), and the patterns learnt so far.
pub struct MemoryPlan {
    /// Per slot: `(made by step, last read by step)` for the values runs may place.
    lifetimes: Vec<Option<(usize, usize)>>,
    /// Concatenations that may be placed in place (see [`Concat`]).
    concats: Vec<Concat>,
    /// Outputs that may be placed over an input (see [`Alias`]).
    aliases: Vec<Alias>,
    /// Per slot: whether it is a graph output a host kernel makes (placed in `blocks`).
    outputs: Vec<bool>,
    blocks: Arc<OutputBlocks>,
    patterns: Mutex<HashMap<ShapeKey, Arc<Pattern>>>,
    arenas_allocated: AtomicU64,
    idle_bytes: Arc<AtomicUsize>,
    assembled: AtomicU64,
    handed: AtomicU64,
}

/// What a plan's memory planning did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    /// Sets of input shapes planned for.
    pub patterns: usize,
    /// Arenas allocated over the plan's life (a steady state allocates none).
    pub arenas_allocated: u64,
    /// Arena bytes of the largest pattern, and the bytes its values would take one allocation
    /// each (the difference is what liveness saves).
    pub arena_bytes: usize,
    pub value_bytes: usize,
    /// Concatenations the patterns place in place, over all patterns.
    pub concats_in_place: usize,
    /// Outputs the patterns place over an input, over all patterns.
    pub aliased: usize,
    /// Runs' outputs handed to their kernels over their input so far.
    pub aliases_handed: u64,
    /// Runs' concatenations assembled in place so far (their copies skipped).
    pub concats_assembled: u64,
    /// Blocks allocated for graph outputs over the plan's life (a steady state whose callers
    /// drop the outputs they got allocates none).
    pub output_blocks_allocated: u64,
}

impl MemoryPlan {
    /// A plan over `lifetimes` (per slot, `None` for values runs must not place), with the
    /// `concats` that may be placed in place, the `aliases` that may share a range and the
    /// graph `outputs` (slots) host kernels make. No slot is in two concats or aliases, nor in
    /// both.
    pub(super) fn new(
        lifetimes: Vec<Option<(usize, usize)>>,
        concats: Vec<Concat>,
        aliases: Vec<Alias>,
        outputs: &[usize],
    ) -> Self {
        let mut is_output = vec![false; lifetimes.len()];
        for &s in outputs {
            if let Some(o) = is_output.get_mut(s) {
                *o = true;
            }
        }
        MemoryPlan {
            lifetimes,
            concats,
            aliases,
            outputs: is_output,
            blocks: Arc::default(),
            patterns: Mutex::new(HashMap::new()),
            arenas_allocated: AtomicU64::new(0),
            idle_bytes: Arc::new(AtomicUsize::new(0)),
            assembled: AtomicU64::new(0),
            handed: AtomicU64::new(0),
        }
    }

    /// Whether runs may place the value in `slot` (in their arena, or a graph output's block):
    /// the sizes a run records.
    pub(super) fn plannable(&self, slot: usize) -> bool {
        matches!(self.lifetimes.get(slot), Some(Some(_)))
            || self.outputs.get(slot).copied().unwrap_or(false)
    }

    /// An arena for a run with input shapes `key`, when a pattern exists for them.
    pub(super) fn arena(&self, key: &ShapeKey) -> Option<RunArena> {
        let pattern = self.patterns.lock().ok()?.get(key).cloned()?;
        let reused = pattern.idle.lock().ok().and_then(|mut idle| {
            // Only an arena nothing else holds: a tensor of an earlier run may still be alive.
            let i = idle.iter().position(|a| Arc::strong_count(a) == 1)?;
            let a = idle.swap_remove(i);
            pattern.idle_bytes.fetch_sub(a.len, Ordering::Relaxed);
            Some(a)
        });
        let arena = match reused {
            Some(a) => a,
            None => {
                self.arenas_allocated.fetch_add(1, Ordering::Relaxed);
                Arc::new(Arena::new(pattern.size)?)
            }
        };
        Some(RunArena {
            pattern,
            arena,
            blocks: self.blocks.clone(),
        })
    }

    /// The concatenations that may be placed in place.
    pub(super) fn concats(&self) -> &[Concat] {
        &self.concats
    }

    /// Counts a concatenation a run assembled in place.
    pub(super) fn assembled_one(&self) {
        self.assembled.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts the outputs a run handed to their kernel over their input.
    pub(super) fn handed(&self, outputs: usize) {
        if outputs > 0 {
            self.handed.fetch_add(outputs as u64, Ordering::Relaxed);
        }
    }

    /// Learns the pattern for `key` from the sizes a run recorded (per slot, bytes) and the
    /// concatenations whose inputs were contiguous runs of their output (`contiguous`, per
    /// entry of [`concats`](Self::concats)).
    pub(super) fn learn(&self, key: ShapeKey, sizes: &[Option<usize>], contiguous: &[bool]) {
        let Ok(mut patterns) = self.patterns.lock() else {
            return;
        };
        if patterns.len() >= MAX_PATTERNS || patterns.contains_key(&key) {
            return;
        }
        let slots = self.lifetimes.len();
        let outputs = sizes
            .iter()
            .enumerate()
            .filter(|(slot, _)| self.outputs.get(*slot).copied().unwrap_or(false))
            .filter_map(|(slot, bytes)| Some((slot, (*bytes).filter(|&b| b > 0)?)))
            .collect();
        let mut values: Vec<(usize, usize, (usize, usize))> = sizes
            .iter()
            .enumerate()
            .filter_map(|(slot, bytes)| {
                let bytes = (*bytes)?.checked_next_multiple_of(ALIGN)?;
                let life = (*self.lifetimes.get(slot)?)?;
                (bytes > 0).then_some((slot, bytes, life))
            })
            .collect();
        // Each concatenation placed in place becomes one value spanning its inputs' and its
        // output's lifetimes, under a slot number past the real ones.
        let mut in_place = Vec::new();
        for (c, _) in self.concats.iter().zip(contiguous).filter(|(_, &ok)| ok) {
            let Some((bytes, life)) = self.span(c, sizes) else {
                continue;
            };
            let members: Vec<usize> = c.inputs.iter().copied().chain([c.output]).collect();
            values.retain(|v| !members.contains(&v.0));
            values.push((slots + in_place.len(), bytes, life));
            in_place.push(c.clone());
        }
        // Each chain of aliases whose values have one size becomes one value too, numbered
        // after the concatenations: a residual stage's sums are each written over their
        // addend and are the next block's addend, written over in turn (ResNet-50: half of
        // its 16 sums went to a range of their own, each then read Z apart in an extra pass
        // when only lone aliases were placed). Aliases come in step order, so a chain's links
        // arrive after the link that made their input.
        let mut aliased = Vec::new();
        // Per chain: its slots, its range's bytes, its lifetime.
        let mut chains: Vec<(Vec<usize>, usize, (usize, usize))> = Vec::new();
        let mut chain_of: HashMap<usize, usize> = HashMap::new();
        for a in &self.aliases {
            let bytes = |s: usize| sizes.get(s).copied().flatten().filter(|&b| b > 0);
            let life = |s: usize| self.lifetimes.get(s).copied().flatten();
            let (Some(input), Some((made, _)), Some((_, last))) =
                (bytes(a.input), life(a.input), life(a.output))
            else {
                continue;
            };
            let Some(range) = input.checked_next_multiple_of(ALIGN) else {
                continue;
            };
            if bytes(a.output) != Some(input) || chain_of.contains_key(&a.output) {
                continue;
            }
            match chain_of.get(&a.input).copied() {
                Some(c) => {
                    let Some(chain) = chains.get_mut(c).filter(|chain| chain.1 == range) else {
                        continue;
                    };
                    chain.0.push(a.output);
                    chain.2 = (chain.2 .0.min(made), chain.2 .1.max(last));
                    chain_of.insert(a.output, c);
                }
                None => {
                    chain_of.insert(a.input, chains.len());
                    chain_of.insert(a.output, chains.len());
                    chains.push((vec![a.input, a.output], range, (made, last)));
                }
            }
            aliased.push(a.clone());
        }
        values.retain(|v| !chain_of.contains_key(&v.0));
        for (c, (_, range, life)) in chains.iter().enumerate() {
            values.push((slots + in_place.len() + c, *range, *life));
        }
        let (mut places, size) = assign(&values, slots + in_place.len() + chains.len());
        for (g, c) in in_place.iter().enumerate() {
            let Some(Some((base, _))) = places.get(slots + g).copied() else {
                continue;
            };
            let mut at = base;
            for &s in &c.inputs {
                let bytes = sizes.get(s).copied().flatten().unwrap_or(0);
                if let Some(p) = places.get_mut(s) {
                    *p = Some((at, bytes));
                }
                at += bytes;
            }
            if let Some(p) = places.get_mut(c.output) {
                *p = Some((base, at - base));
            }
        }
        for (c, (members, ..)) in chains.iter().enumerate() {
            let place = places.get(slots + in_place.len() + c).copied().flatten();
            for &s in members {
                if let Some(p) = places.get_mut(s) {
                    *p = place;
                }
            }
        }
        places.truncate(slots);
        patterns.insert(
            key,
            Arc::new(Pattern {
                places,
                outputs,
                in_place,
                aliased,
                size,
                idle: Mutex::new(Vec::new()),
                idle_bytes: self.idle_bytes.clone(),
            }),
        );
    }

    /// The bytes and lifetime of `c` placed in place, when its sizes allow it: every input
    /// planned, each but the last a whole number of [`ALIGN`] (the next starts where it ends,
    /// and kernels get aligned outputs), and the output exactly their sum.
    fn span(&self, c: &Concat, sizes: &[Option<usize>]) -> Option<(usize, (usize, usize))> {
        let life = |s: usize| *self.lifetimes.get(s)?;
        let (mut total, mut start, mut end) = (0usize, usize::MAX, 0usize);
        for (i, &s) in c.inputs.iter().enumerate() {
            let bytes = (*sizes.get(s)?)?;
            if bytes == 0 || (i + 1 < c.inputs.len() && bytes % ALIGN != 0) {
                return None;
            }
            let (made, last) = life(s)?;
            (start, end) = (start.min(made), end.max(last));
            total = total.checked_add(bytes)?;
        }
        let (made, last) = life(c.output)?;
        if (*sizes.get(c.output)?)? != total {
            return None;
        }
        Some((
            total.checked_next_multiple_of(ALIGN)?,
            (start.min(made), end.max(last)),
        ))
    }

    pub fn stats(&self) -> MemoryStats {
        let patterns = self.patterns.lock().map(|p| p.clone()).unwrap_or_default();
        let largest = patterns.values().max_by_key(|p| p.size);
        MemoryStats {
            patterns: patterns.len(),
            arenas_allocated: self.arenas_allocated.load(Ordering::Relaxed),
            arena_bytes: largest.map_or(0, |p| p.size),
            value_bytes: largest.map_or(0, |p| p.places.iter().flatten().map(|(_, b)| b).sum()),
            concats_in_place: patterns.values().map(|p| p.in_place.len()).sum(),
            aliased: patterns.values().map(|p| p.aliased.len()).sum(),
            aliases_handed: self.handed.load(Ordering::Relaxed),
            concats_assembled: self.assembled.load(Ordering::Relaxed),
            output_blocks_allocated: self.blocks.allocated.load(Ordering::Relaxed),
        }
    }
}

/// A plan's blocks for graph outputs (see the module's documentation): each held by the pool
/// and by the tensor placed in it, idle when the pool alone holds it.
#[derive(Default)]
struct OutputBlocks {
    blocks: Mutex<Vec<Arc<Arena>>>,
    allocated: AtomicU64,
}

impl OutputBlocks {
    /// An idle block of exactly `len` bytes, or a new one when the bounds allow; `None`: the
    /// output is allocated as without planning.
    fn take(&self, len: usize) -> Option<PlannedBuf> {
        let mut blocks = self.blocks.lock().ok()?;
        // Under the lock nothing can clone a block the pool alone holds: one with a strong
        // count of 1 is idle for good.
        let idle = |b: &Arc<Arena>| Arc::strong_count(b) == 1;
        let block = match blocks.iter().find(|b| b.len == len && idle(b)) {
            Some(b) => b.clone(),
            None => {
                let fits = |blocks: &[Arc<Arena>]| {
                    let bytes: usize = blocks.iter().map(|b| b.len).sum();
                    blocks.len() < MAX_OUTPUT_BLOCKS
                        && bytes
                            .checked_add(len)
                            .is_some_and(|t| t <= MAX_OUTPUT_BYTES)
                };
                while !fits(&blocks) {
                    // Room made from idle blocks of other sizes (shapes no longer asked for).
                    let i = blocks.iter().position(idle)?;
                    blocks.swap_remove(i);
                }
                let b = Arc::new(Arena::zeroed(len)?);
                self.allocated.fetch_add(1, Ordering::Relaxed);
                blocks.push(b.clone());
                b
            }
        };
        Some(PlannedBuf {
            ptr: block.ptr,
            len,
            keep: block,
            holds_input: false,
        })
    }
}

/// Greedy-by-size offsets: the largest values first, each at the lowest offset where it
/// overlaps no placed value whose lifetime overlaps its own. Returns per-slot places and the
/// arena size.
fn assign(
    values: &[(usize, usize, (usize, usize))],
    slots: usize,
) -> (Vec<Option<(usize, usize)>>, usize) {
    let mut order: Vec<&(usize, usize, (usize, usize))> = values.iter().collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut placed: Vec<(usize, usize, (usize, usize))> = Vec::new(); // (offset, bytes, life)
    let mut places = vec![None; slots];
    let mut size = 0usize;
    for &&(slot, bytes, (start, end)) in &order {
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|(_, _, (s, e))| *s <= end && start <= *e)
            .map(|(o, b, _)| (*o, *b))
            .collect();
        busy.sort_unstable();
        let mut offset = 0usize;
        for (o, b) in busy {
            if offset.saturating_add(bytes) <= o {
                break;
            }
            offset = offset.max(o.saturating_add(b));
        }
        placed.push((offset, bytes, (start, end)));
        if let Some(p) = places.get_mut(slot) {
            *p = Some((offset, bytes));
        }
        size = size.max(offset.saturating_add(bytes));
    }
    (places, size)
}

/// One run's arena: where its planned values go. Returned to its pattern when dropped.
pub(super) struct RunArena {
    pattern: Arc<Pattern>,
    arena: Arc<Arena>,
    blocks: Arc<OutputBlocks>,
}

impl RunArena {
    /// The concatenation run by plan step `step` when this pattern placed its inputs inside
    /// its output.
    pub(super) fn in_place(&self, step: usize) -> Option<&Concat> {
        self.pattern.in_place.iter().find(|c| c.step == step)
    }

    /// The input slot whose range this pattern gave output `slot` of step `step` (see
    /// [`Alias`]).
    pub(super) fn aliased(&self, step: usize, slot: usize) -> Option<usize> {
        let a = self.pattern.aliased.iter();
        a.filter(|a| a.step == step && a.output == slot)
            .map(|a| a.input)
            .next()
    }

    /// The range planned for `slot`, if any: in the arena, or a graph output's block.
    pub(super) fn place(&self, slot: usize) -> Option<PlannedBuf> {
        if let Some(&(_, len)) = self.pattern.outputs.iter().find(|(s, _)| *s == slot) {
            return self.blocks.take(len);
        }
        let (offset, len) = (*self.pattern.places.get(slot)?)?;
        if offset.checked_add(len)? > self.arena.len {
            return None;
        }
        // SAFETY: `offset + len` is within the arena (checked above).
        let ptr = unsafe { NonNull::new_unchecked(self.arena.ptr.as_ptr().add(offset)) };
        Some(PlannedBuf {
            ptr,
            len,
            keep: self.arena.clone(),
            holds_input: false,
        })
    }
}

impl Drop for RunArena {
    fn drop(&mut self) {
        if let Ok(mut idle) = self.pattern.idle.lock() {
            let bytes = &self.pattern.idle_bytes;
            let len = self.arena.len;
            let fits = bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    b.checked_add(len).filter(|&t| t <= MAX_IDLE_BYTES)
                })
                .is_ok();
            if fits && idle.len() < MAX_IDLE_ARENAS {
                idle.push(self.arena.clone());
            } else if fits {
                bytes.fetch_sub(len, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn values_whose_lifetimes_do_not_overlap_share_memory() {
        // a: steps 0-1, b: 1-2, c: 2-3, d: 0-3 (alive throughout).
        let values = [
            (0, 128, (0, 1)),
            (1, 64, (1, 2)),
            (2, 128, (2, 3)),
            (3, 64, (0, 3)),
        ];
        let (places, size) = assign(&values, 4);
        let (a, b, c, d) = (
            places[0].unwrap(),
            places[1].unwrap(),
            places[2].unwrap(),
            places[3].unwrap(),
        );
        // a and c never live together: the same memory.
        assert_eq!(a.0, c.0);
        // Everything alive at once is disjoint.
        let disjoint = |x: (usize, usize), y: (usize, usize)| x.0 + x.1 <= y.0 || y.0 + y.1 <= x.0;
        for (x, y) in [(a, b), (a, d), (b, c), (b, d), (c, d)] {
            assert!(disjoint(x, y), "{x:?} {y:?}");
        }
        assert_eq!(
            size,
            128 + 64 + 64,
            "less than the 384 bytes of one buffer each"
        );
    }

    #[test]
    fn arenas_are_reused_only_when_nothing_holds_them() {
        let plan = MemoryPlan::new(
            vec![Some((0, 1)), Some((1, 2)), None],
            Vec::new(),
            Vec::new(),
            &[],
        );
        let key: ShapeKey = vec![(DType::F32, vec![2])];
        assert!(plan.arena(&key).is_none(), "nothing learnt yet");
        plan.learn(key.clone(), &[Some(100), Some(10), Some(1000)], &[]);
        let run = plan.arena(&key).expect("pattern");
        let a = run.place(0).expect("slot 0 planned");
        assert_eq!((a.len, a.ptr.as_ptr() as usize % ALIGN), (128, 0));
        assert!(run.place(2).is_none(), "slot 2 is not plannable");
        drop(run);
        // `a` still holds the first arena: the next run gets a second one.
        let second = plan.arena(&key).expect("pattern");
        assert_eq!(plan.stats().arenas_allocated, 2);
        drop(second);
        drop(a);
        let _third = plan.arena(&key).expect("pattern");
        assert_eq!(plan.stats().arenas_allocated, 2, "an idle arena is reused");
    }

    #[test]
    fn an_alias_of_one_size_shares_one_range_and_others_do_not() {
        // Step 1 reads slot 0 last and makes slot 1 (declared aliased); slot 2 lives
        // throughout. Slot 1 is read by step 2.
        let alias = Alias {
            step: 1,
            input: 0,
            output: 1,
        };
        let plan = MemoryPlan::new(
            vec![Some((0, 1)), Some((1, 2)), Some((0, 2))],
            Vec::new(),
            vec![alias.clone()],
            &[],
        );
        let same: ShapeKey = vec![(DType::F32, vec![1])];
        plan.learn(same.clone(), &[Some(256), Some(256), Some(64)], &[]);
        let run = plan.arena(&same).expect("pattern");
        let (z, y, other) = (
            run.place(0).expect("z"),
            run.place(1).expect("y"),
            run.place(2).expect("other"),
        );
        assert_eq!((z.ptr, z.len), (y.ptr, y.len), "y over z");
        assert!(
            !y.holds_input,
            "the run says whether z is there, not the pattern"
        );
        assert_ne!(other.ptr, z.ptr);
        assert_eq!(
            (run.aliased(1, 1), run.aliased(1, 0), run.aliased(2, 1)),
            (Some(0), None, None)
        );
        assert_eq!(plan.stats().aliased, 1);
        // Sizes that differ (an output larger than its input): apart, as without the alias.
        let other_sizes: ShapeKey = vec![(DType::F32, vec![2])];
        plan.learn(other_sizes.clone(), &[Some(256), Some(512), Some(64)], &[]);
        let run = plan.arena(&other_sizes).expect("pattern");
        let (z, y) = (run.place(0).expect("z"), run.place(1).expect("y"));
        assert!(
            z.ptr.as_ptr() as usize + z.len <= y.ptr.as_ptr() as usize
                || y.ptr.as_ptr() as usize + y.len <= z.ptr.as_ptr() as usize,
            "live together, so disjoint"
        );
        assert_eq!(run.aliased(1, 1), None);
        assert_eq!(plan.stats().aliased, 1);
    }

    #[test]
    fn a_chain_of_aliases_shares_one_range() {
        // A residual chain: step 1 writes slot 1 over slot 0, step 2 slot 2 over slot 1, step
        // 3 reads slot 2; slot 3 lives throughout, slot 4 (step 3's output) after the chain.
        let link = |step: usize, input: usize, output: usize| Alias {
            step,
            input,
            output,
        };
        let plan = MemoryPlan::new(
            vec![
                Some((0, 1)),
                Some((1, 2)),
                Some((2, 3)),
                Some((0, 3)),
                Some((3, 4)),
            ],
            Vec::new(),
            vec![link(1, 0, 1), link(2, 1, 2)],
            &[],
        );
        let key: ShapeKey = vec![(DType::F32, vec![1])];
        plan.learn(
            key.clone(),
            &[Some(256), Some(256), Some(256), Some(64), Some(256)],
            &[],
        );
        let run = plan.arena(&key).expect("pattern");
        let place = |s: usize| {
            let p = run.place(s).expect("placed");
            (p.ptr.as_ptr() as usize, p.len)
        };
        assert_eq!(place(0), place(1));
        assert_eq!(place(1), place(2));
        assert_eq!((run.aliased(1, 1), run.aliased(2, 2)), (Some(0), Some(1)));
        assert_eq!(plan.stats().aliased, 2);
        // The chain lives until step 3, with slot 3: their ranges are apart.
        let (chain, other) = (place(2), place(3));
        assert!(chain.0 + chain.1 <= other.0 || other.0 + other.1 <= chain.0);
        // A link whose output has another size ends the chain there.
        let sizes: ShapeKey = vec![(DType::F32, vec![2])];
        plan.learn(
            sizes.clone(),
            &[Some(256), Some(256), Some(512), Some(64), Some(256)],
            &[],
        );
        let run = plan.arena(&sizes).expect("pattern");
        assert_eq!(
            (run.aliased(1, 1), run.aliased(2, 2)),
            (Some(0), None),
            "the second link is not placed"
        );
        let (p0, p1, p2) = (
            run.place(0).expect("0"),
            run.place(1).expect("1"),
            run.place(2).expect("2"),
        );
        assert_eq!(p0.ptr, p1.ptr);
        let (a, b) = (p1.ptr.as_ptr() as usize, p2.ptr.as_ptr() as usize);
        assert!(
            a + p1.len <= b || b + p2.len <= a,
            "slot 2 apart from the chain"
        );
    }

    #[test]
    fn idle_arenas_are_bounded_in_bytes_over_all_shapes() {
        let plan = MemoryPlan::new(vec![Some((0, 0))], Vec::new(), Vec::new(), &[]);
        // Patterns whose arenas are each 3/8 of the idle bound: two fit, the third is freed.
        let big = MAX_IDLE_BYTES / 8 * 3;
        for batch in 1..=3usize {
            let key: ShapeKey = vec![(DType::F32, vec![batch])];
            plan.learn(key.clone(), &[Some(big)], &[]);
            drop(plan.arena(&key).expect("pattern"));
        }
        let kept = plan.idle_bytes.load(Ordering::Relaxed);
        assert_eq!(kept, 2 * big.next_multiple_of(ALIGN), "{kept}");
        // The third shapes' next run allocates again; the first's reuses its arena.
        drop(plan.arena(&vec![(DType::F32, vec![3])]).expect("pattern"));
        drop(plan.arena(&vec![(DType::F32, vec![1])]).expect("pattern"));
        assert_eq!(plan.stats().arenas_allocated, 4);
    }
}
