//! Kernel functions (kfuncs) called by the eBPF programs, which the loader library does not link.
//!
//! A program calls a kfunc through a placeholder helper number
//! ([`keepalive_common::KFUNC_MARK_RDONLY_CAST`]); before the object is loaded, each such call is
//! rewritten into a kfunc call (`BPF_PSEUDO_KFUNC_CALL`, the kfunc's id in the kernel's BTF).
//! Where the kernel has no such kfunc, the calls stay as they are, the verifier refuses the
//! programs that make them, and the attach plan takes the next strategy.
//!
//! `bpf_rdonly_cast(obj, btf_id)`: Linux 6.2+, every program type; it retypes a kernel address
//! as a read-only pointer to a BTF type, which the program then reads with plain, fault-safe loads.

use aya::Btf;
use aya_obj::btf::BtfKind;
use keepalive_common::{Offsets, KFUNC_MARK_RDONLY_CAST};

/// `call` (BPF_JMP | BPF_CALL).
const OP_CALL: u8 = 0x85;
/// Source register value of a kfunc call.
const PSEUDO_KFUNC_CALL: u8 = 2;
/// ELF section type `SHT_PROGBITS` and flag `SHF_EXECINSTR`.
const SHT_PROGBITS: u32 = 1;
const SHF_EXECINSTR: u64 = 4;

/// Why an object's kfunc calls could not be rewritten.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum KfuncError {
    #[error("reading the eBPF object's section headers: {0}")]
    Elf(&'static str),
}

/// Rewrites the `bpf_rdonly_cast` placeholder calls of `object` and sets `offsets.tcp_sock_btf_id`,
/// when the kernel's BTF has the kfunc and `struct tcp_sock`. `Err` says why the typed strategies
/// cannot be used (the object is then left as it was).
pub fn prepare_rdonly_cast(object: &mut [u8], btf: Option<&Btf>, offsets: &mut Offsets) -> Result<(), String> {
    let btf = btf.ok_or("kernel BTF unavailable")?;
    let kfunc = btf
        .id_by_type_name_kind("bpf_rdonly_cast", BtfKind::Func)
        .map_err(|_| "the kernel has no bpf_rdonly_cast kfunc (Linux 6.2+)".to_string())?;
    let tcp_sock = btf
        .id_by_type_name_kind("tcp_sock", BtfKind::Struct)
        .map_err(|_| "struct tcp_sock is not in the kernel's BTF".to_string())?;
    let n = patch_calls(object, KFUNC_MARK_RDONLY_CAST, kfunc).map_err(|e| e.to_string())?;
    log::debug!("bpf_rdonly_cast (BTF id {kfunc}): {n} calls rewritten; struct tcp_sock is BTF id {tcp_sock}");
    offsets.tcp_sock_btf_id = tcp_sock;
    Ok(())
}

/// Rewrites every `call mark` of the executable sections of the ELF `object` into a kfunc call of
/// BTF id `btf_id` in the kernel's own BTF; returns how many.
pub fn patch_calls(object: &mut [u8], mark: u32, btf_id: u32) -> Result<usize, KfuncError> {
    let mut n = 0;
    for (start, len) in code_sections(object)? {
        for insn in object[start..start + len].chunks_exact_mut(8) {
            let imm = u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            if insn[0] == OP_CALL && insn[1] == 0 && insn[2] == 0 && insn[3] == 0 && imm == mark {
                insn[1] = PSEUDO_KFUNC_CALL << 4;
                insn[4..8].copy_from_slice(&btf_id.to_le_bytes());
                n += 1;
            }
        }
    }
    Ok(n)
}

/// (file offset, size) of each executable `PROGBITS` section of a little-endian ELF64 object.
fn code_sections(elf: &[u8]) -> Result<Vec<(usize, usize)>, KfuncError> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])));
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err(KfuncError::Elf("not a little-endian ELF64 object"));
    }
    let bad = KfuncError::Elf("header out of bounds");
    let shoff = u64_at(0x28).ok_or(bad.clone())? as usize;
    let shentsize = u16_at(0x3a).ok_or(bad.clone())?;
    let shnum = u16_at(0x3c).ok_or(bad.clone())?;
    if shentsize < 0x40 {
        return Err(KfuncError::Elf("section header entries too small"));
    }
    let mut out = Vec::new();
    for i in 0..shnum {
        let h = shoff + i * shentsize;
        let kind = u32_at(h + 4).ok_or(KfuncError::Elf("section header out of bounds"))?;
        let flags = u64_at(h + 8).ok_or(KfuncError::Elf("section header out of bounds"))?;
        if kind != SHT_PROGBITS || flags & SHF_EXECINSTR == 0 {
            continue;
        }
        let off = u64_at(h + 0x18).ok_or(KfuncError::Elf("section header out of bounds"))? as usize;
        let size = u64_at(h + 0x20).ok_or(KfuncError::Elf("section header out of bounds"))? as usize;
        if off.checked_add(size).is_none_or(|end| end > elf.len()) {
            return Err(KfuncError::Elf("section data out of bounds"));
        }
        out.push((off, size));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 object: one executable section holding `code`, one data section holding
    /// `data`, section headers after them.
    fn elf(code: &[u8], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 0x40];
        v[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let code_off = v.len();
        v.extend_from_slice(code);
        let data_off = v.len();
        v.extend_from_slice(data);
        let shoff = v.len();
        v[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        v[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        v[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        let header = |kind: u32, flags: u64, off: usize, size: usize| {
            let mut h = vec![0u8; 0x40];
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&flags.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        v.extend(header(0, 0, 0, 0));
        v.extend(header(SHT_PROGBITS, SHF_EXECINSTR | 2, code_off, code.len()));
        v.extend(header(SHT_PROGBITS, 2, data_off, data.len()));
        v
    }

    fn call(imm: u32) -> [u8; 8] {
        let mut i = [OP_CALL, 0, 0, 0, 0, 0, 0, 0];
        i[4..].copy_from_slice(&imm.to_le_bytes());
        i
    }

    #[test]
    fn marked_calls_in_code_become_kfunc_calls_and_nothing_else_changes() {
        let mov = [0xb7, 0x01, 0, 0, 7, 0, 0, 0];
        let code: Vec<u8> = [call(14), call(KFUNC_MARK_RDONLY_CAST), mov, call(KFUNC_MARK_RDONLY_CAST)].concat();
        // The same bytes in a data section are not code.
        let data = call(KFUNC_MARK_RDONLY_CAST);
        let mut obj = elf(&code, &data);
        let before = obj.clone();
        assert_eq!(patch_calls(&mut obj, KFUNC_MARK_RDONLY_CAST, 12345), Ok(2));
        let c = 0x40;
        assert_eq!(obj[c..c + 8], call(14));
        assert_eq!(obj[c + 8..c + 16], [OP_CALL, 0x20, 0, 0, 0x39, 0x30, 0, 0]);
        assert_eq!(obj[c + 16..c + 24], mov);
        assert_eq!(obj[c + 24..c + 32], [OP_CALL, 0x20, 0, 0, 0x39, 0x30, 0, 0]);
        assert_eq!(obj[c + 32..], before[c + 32..], "data and headers untouched");
    }

    #[test]
    fn objects_that_are_not_elf64_or_are_cut_short_are_refused() {
        assert!(patch_calls(&mut b"not an object".to_vec(), 1, 2).is_err());
        // One section header more than the file holds.
        let mut obj = elf(&call(KFUNC_MARK_RDONLY_CAST), &[]);
        obj[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes());
        assert!(patch_calls(&mut obj, KFUNC_MARK_RDONLY_CAST, 2).is_err());
        // A code section whose data runs past the end of the file.
        let mut obj = elf(&call(KFUNC_MARK_RDONLY_CAST), &[]);
        let size_at = obj.len() - 2 * 0x40 + 0x20;
        obj[size_at..size_at + 8].copy_from_slice(&4096u64.to_le_bytes());
        assert!(patch_calls(&mut obj, KFUNC_MARK_RDONLY_CAST, 2).is_err());
    }

    /// The object the agent embeds has the placeholder calls the typed strategy needs.
    #[test]
    fn the_embedded_object_calls_the_placeholder() {
        if crate::attach::EBPF_OBJECT.is_empty() {
            return;
        }
        let mut obj = crate::attach::EBPF_OBJECT.to_vec();
        assert!(patch_calls(&mut obj, KFUNC_MARK_RDONLY_CAST, 1).unwrap() >= 3);
    }
}
