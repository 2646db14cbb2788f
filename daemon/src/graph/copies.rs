//! Copies at device boundaries: a pass over a compiled graph's steps that inserts a copy step
//! wherever a value is read in another place than the one it was produced in (a kernel on a
//! device reading a host value, a host kernel or a graph output reading a device value).
//!
//! Each (value, place) pair is copied once, however many steps read it there; graph inputs
//! and constants start on the host; control flow (If, Loop, Scan) runs on the host. A value
//! crossing between devices of different providers goes through the host (two copies), since
//! neither provider can address the other's memory.

use super::compiled::{CopyInfo, Place, Step, Work};
use super::GraphError;
use crate::registry::Snapshot;
use opreg_sdk::{DType, Device, MemoryType};
use std::collections::HashMap;

/// Where a kernel on `device` wants (or puts) a value of `memory`.
pub fn place_of(device: Device, memory: MemoryType) -> Place {
    if memory.host_accessible(device) {
        Place::Host
    } else {
        Place::Device(device)
    }
}

/// Inserts the copy steps `steps` needs. `names` gives each slot's value name (for
/// messages); `outputs` are moved to copies on the host where needed. New slots are added
/// to `types` / `shapes`.
pub fn insert(
    steps: Vec<Step>,
    outputs: &mut [(String, usize)],
    types: &mut Vec<Option<DType>>,
    shapes: &mut Vec<super::import::Shape>,
    names: &HashMap<usize, String>,
    snapshot: &Snapshot,
) -> Result<(Vec<Step>, Vec<CopyInfo>), GraphError> {
    // Slots not produced by a step (inputs, constants) are on the host.
    let mut place: HashMap<usize, Place> = HashMap::new();
    let mut copied: HashMap<(usize, Place), usize> = HashMap::new();
    let mut out = Vec::with_capacity(steps.len());
    let mut infos = Vec::new();
    let mut ctx = Ctx {
        place: &mut place,
        copied: &mut copied,
        types,
        shapes,
        names,
        snapshot,
        infos: &mut infos,
    };
    for mut step in steps {
        // Kernels say where they want each value; control flow runs on the host.
        let (in_memory, out_memory) = match &step.work {
            Work::Kernel(b) => (Some(b.input_memory.clone()), Some(b.output_memory.clone())),
            _ => (None, None),
        };
        let device = step.device;
        let at = |memory: &Option<Vec<MemoryType>>, i: usize| match memory {
            Some(m) => place_of(device, m.get(i).copied().unwrap_or(MemoryType::DEVICE)),
            None => Place::Host,
        };
        for (i, input) in step.inputs.iter_mut().enumerate() {
            let Some(slot) = *input else { continue };
            *input = Some(ctx.ensure(slot, at(&in_memory, i), &step.label, &mut out)?);
        }
        for slot in step.captured.iter_mut() {
            *slot = ctx.ensure(*slot, Place::Host, &step.label, &mut out)?;
        }
        for (k, output) in step.outputs.iter().enumerate() {
            let Some(slot) = *output else { continue };
            ctx.place.insert(slot, at(&out_memory, k));
        }
        out.push(step);
    }
    for (name, slot) in outputs.iter_mut() {
        *slot = ctx.ensure(*slot, Place::Host, &format!("output {name}"), &mut out)?;
    }
    Ok((out, infos))
}

struct Ctx<'a> {
    place: &'a mut HashMap<usize, Place>,
    copied: &'a mut HashMap<(usize, Place), usize>,
    types: &'a mut Vec<Option<DType>>,
    shapes: &'a mut Vec<super::import::Shape>,
    names: &'a HashMap<usize, String>,
    snapshot: &'a Snapshot,
    infos: &'a mut Vec<CopyInfo>,
}

impl Ctx<'_> {
    /// The slot holding `slot`'s value at `want`, adding copy steps to `steps` if needed.
    fn ensure(
        &mut self,
        slot: usize,
        want: Place,
        reader: &str,
        steps: &mut Vec<Step>,
    ) -> Result<usize, GraphError> {
        let from = self.place.get(&slot).copied().unwrap_or(Place::Host);
        if from == want {
            return Ok(slot);
        }
        if let Some(&c) = self.copied.get(&(slot, want)) {
            return Ok(c);
        }
        let (Place::Device(a), Place::Device(b)) = (from, want) else {
            return self.copy(slot, from, want, reader, steps);
        };
        let provider = |d: Device| {
            self.snapshot.device(d).ok_or_else(|| {
                GraphError::Invalid(format!(
                    "{reader}: no loaded plugin provides device {d} any more"
                ))
            })
        };
        if provider(a)?.same_provider(&provider(b)?) {
            self.copy(slot, from, want, reader, steps)
        } else {
            let on_host = self.ensure(slot, Place::Host, reader, steps)?;
            self.copy(on_host, Place::Host, want, reader, steps)
        }
    }

    fn copy(
        &mut self,
        slot: usize,
        from: Place,
        to: Place,
        reader: &str,
        steps: &mut Vec<Step>,
    ) -> Result<usize, GraphError> {
        for p in [from, to] {
            if let Place::Device(d) = p {
                if self.snapshot.device(d).is_none() {
                    return Err(GraphError::Invalid(format!(
                        "{reader}: a value must move {from} -> {to}, and no loaded plugin \
                         provides device {d} (a kernel registered for a device needs a device \
                         provider)"
                    )));
                }
            }
        }
        let new = self.types.len();
        self.types.push(self.types.get(slot).copied().flatten());
        self.shapes.push(self.shapes.get(slot).cloned().flatten());
        let value = self
            .names
            .get(&slot)
            .cloned()
            .unwrap_or_else(|| format!("#{slot}"));
        steps.push(Step {
            label: format!("copy {value} {from}->{to}"),
            work: Work::Copy { from, to },
            device: match to {
                Place::Device(d) => d,
                Place::Host => match from {
                    Place::Device(d) => d,
                    Place::Host => Device::CPU,
                },
            },
            inputs: vec![Some(slot)],
            captured: Vec::new(),
            outputs: vec![Some(new)],
            release: Vec::new(),
            concat_axis: None,
        });
        self.place.insert(new, to);
        self.copied.insert((slot, to), new);
        self.infos.push(CopyInfo { value, from, to });
        Ok(new)
    }
}
