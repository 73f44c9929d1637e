//! Kernel 6.1's stack rule, checked on the host in milliseconds: a program
//! and the functions it calls may use at most 512 bytes of stack together,
//! each frame counted rounded up to 32 bytes (`check_max_stack_depth` in
//! the verifier of 6.1; newer kernels count frames without the rounding,
//! so a program can load here on 6.18 and be refused by Debian 12's 6.1).
//! Without this test such a change is caught only by the kernel matrix,
//! half an hour later.
//!
//! The object is read as the verifier reads it: each function's frame is
//! the deepest stack slot its instructions touch (a load or store through
//! `r10`, or `r10` plus an offset handed on as a pointer), and a BPF-to-BPF
//! call (`call` with `src_reg` 1) adds the callee's frame, found through the
//! call's relocation or, within a section, its relative offset.

use std::collections::HashMap;

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex, SymbolKind};
use service_agent::datapath::EBPF_OBJECT;
use service_common::PROGRAMS;

/// The verifier's limit for a program and its calls together.
const MAX_STACK: u64 = 512;
/// The rounding 6.1 applies to every frame of a call chain.
const FRAME_ROUNDING: u64 = 32;
/// The frame pointer register.
const R10: u8 = 10;

/// One function of the object: where it is, the stack it uses itself, and
/// the functions it calls.
struct Function {
    name: String,
    /// Deepest byte below `r10` it touches.
    depth: u64,
    /// Its BPF-to-BPF calls: (section, byte offset of the callee).
    calls: Vec<(SectionIndex, u64)>,
}

/// Every function of the object, by (section, byte offset).
fn functions(elf: &object::File) -> HashMap<(SectionIndex, u64), Function> {
    // A section symbol's relocated calls name the section, not the callee.
    let section_symbols: HashMap<object::SymbolIndex, SectionIndex> = elf
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Section)
        .filter_map(|s| Some((s.index(), s.section_index()?)))
        .collect();
    let function_at: HashMap<object::SymbolIndex, (SectionIndex, u64)> = elf
        .symbols()
        .filter(|s| s.kind() == SymbolKind::Text)
        .filter_map(|s| Some((s.index(), (s.section_index()?, s.address()))))
        .collect();
    let mut out = HashMap::new();
    for symbol in elf.symbols().filter(|s| s.kind() == SymbolKind::Text) {
        let Some(section_index) = symbol.section_index() else {
            continue;
        };
        let section = elf.section_by_index(section_index).expect("its section");
        let data = section.data().expect("section data");
        let relocations: HashMap<u64, RelocationTarget> = section
            .relocations()
            .map(|(offset, relocation)| (offset, relocation.target()))
            .collect();
        let start = symbol.address();
        let end = start + symbol.size();
        let code = &data[start as usize..end as usize];
        let mut depth = 0u64;
        let mut calls = Vec::new();
        // Registers holding `r10` plus an offset (a stack pointer handed on).
        let mut frame_offset: [Option<i64>; 11] = [None; 11];
        let mut pc = 0usize;
        while pc + 8 <= code.len() {
            let insn = &code[pc..pc + 8];
            let opcode = insn[0];
            let dst = insn[1] & 0x0f;
            let src = insn[1] >> 4;
            let off = i64::from(i16::from_le_bytes([insn[2], insn[3]]));
            let imm = i64::from(i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]));
            let mut touch = |offset: i64| {
                if offset < 0 {
                    depth = depth.max(offset.unsigned_abs());
                }
            };
            match opcode & 0x07 {
                // LDX: load through `src`.
                0x01 if src == R10 => touch(off),
                // ST, STX: store through `dst`.
                0x02 | 0x03 if dst == R10 => touch(off),
                _ => {}
            }
            match opcode {
                // mov64 dst, src
                0xbf => frame_offset[usize::from(dst)] = (src == R10).then_some(0),
                // add64 dst, imm
                0x07 => {
                    if let Some(base) = frame_offset[usize::from(dst)] {
                        frame_offset[usize::from(dst)] = Some(base + imm);
                        touch(base + imm);
                    }
                }
                // call: a BPF-to-BPF call when src_reg is 1; every call
                // clobbers r0-r5.
                0x85 => {
                    if src == 1 {
                        let at = start + pc as u64;
                        let callee = match relocations.get(&at) {
                            Some(RelocationTarget::Symbol(symbol)) => {
                                function_at.get(symbol).copied().or_else(|| {
                                    section_symbols
                                        .get(symbol)
                                        .map(|section| (*section, ((imm + 1) * 8) as u64))
                                })
                            }
                            Some(_) => None,
                            None => Some((section_index, (at as i64 + (imm + 1) * 8) as u64)),
                        };
                        calls.push(callee.unwrap_or_else(|| {
                            panic!(
                                "{}: call at byte {at} has no callee",
                                symbol.name().unwrap_or("?")
                            )
                        }));
                    }
                    frame_offset[..=5].fill(None);
                }
                // Any other write of a register forgets what it held.
                _ if matches!(opcode & 0x07, 0x04 | 0x07 | 0x01) || opcode == 0x18 => {
                    frame_offset[usize::from(dst)] = None;
                }
                _ => {}
            }
            // A 64-bit immediate load takes two instruction slots.
            pc += if opcode == 0x18 { 16 } else { 8 };
        }
        out.insert(
            (section_index, start),
            Function {
                name: symbol.name().unwrap_or("?").to_owned(),
                depth,
                calls,
            },
        );
    }
    out
}

/// The deepest call chain from `at`, as 6.1 counts it: its total and the
/// frames on it (`name(depth)`).
fn worst_chain(
    functions: &HashMap<(SectionIndex, u64), Function>,
    at: (SectionIndex, u64),
    seen: &mut Vec<(SectionIndex, u64)>,
) -> (u64, Vec<String>) {
    let function = &functions[&at];
    let frame = function.depth.max(1).div_ceil(FRAME_ROUNDING) * FRAME_ROUNDING;
    seen.push(at);
    let mut deepest = (0, Vec::new());
    for callee in &function.calls {
        // Recursion is refused by the verifier anyway; stop rather than loop.
        if seen.contains(callee) || !functions.contains_key(callee) {
            continue;
        }
        let chain = worst_chain(functions, *callee, seen);
        if chain.0 > deepest.0 {
            deepest = chain;
        }
    }
    seen.pop();
    let mut names = vec![format!("{}({})", function.name, function.depth)];
    names.extend(deepest.1);
    (frame + deepest.0, names)
}

#[test]
fn every_program_fits_the_stack_kernel_6_1_allows() {
    let elf = object::File::parse(EBPF_OBJECT).expect("parsing the eBPF object");
    let functions = functions(&elf);
    let mut over = Vec::new();
    let mut deepest_chain = 0;
    for spec in &PROGRAMS {
        let (&at, _) = functions
            .iter()
            .find(|(_, f)| f.name == spec.name)
            .unwrap_or_else(|| panic!("program {} is not in the object", spec.name));
        let (total, chain) = worst_chain(&functions, at, &mut Vec::new());
        deepest_chain = deepest_chain.max(chain.len());
        if total > MAX_STACK {
            over.push(format!(
                "{} uses {total} bytes: {}",
                spec.name,
                chain.join(" -> ")
            ));
        }
    }
    // The walk follows calls (the hooks hand each family to a function of
    // its own), or it would check one frame and pass anything.
    assert!(
        deepest_chain >= 3,
        "no program's deepest chain has three frames: the calls were not followed"
    );
    assert!(
        over.is_empty(),
        "over the {MAX_STACK} bytes of stack kernel 6.1 allows (frames rounded up to {FRAME_ROUNDING}):\n{}",
        over.join("\n")
    );
}
