//! Reading a kernel module's `.modinfo` section (the `key=value` strings `modinfo` prints).
//! Needed for soft dependencies (`softdep=pre: crc32c`), which busybox depmod does not index.

use anyhow::{ensure, Context, Result};

/// The `key=value` pairs of a 64-bit little-endian ELF module's .modinfo section.
pub fn parse(elf: &[u8]) -> Result<Vec<(String, String)>> {
    ensure!(elf.get(..4) == Some(b"\x7fELF"), "not an ELF file");
    ensure!(
        elf.get(4) == Some(&2) && elf.get(5) == Some(&1),
        "not a 64-bit little-endian ELF file"
    );
    let shoff = usize::try_from(read_u64(elf, 0x28)?)?;
    let shentsize = usize::from(read_u16(elf, 0x3a)?);
    let shnum = usize::from(read_u16(elf, 0x3c)?);
    let shstrndx = usize::from(read_u16(elf, 0x3e)?);
    let section = |i: usize| -> Result<(usize, &[u8])> {
        let base = shoff + i * shentsize;
        let name = usize::try_from(read_u32(elf, base)?)?;
        let offset = usize::try_from(read_u64(elf, base + 0x18)?)?;
        let size = usize::try_from(read_u64(elf, base + 0x20)?)?;
        let data = elf
            .get(offset..offset + size)
            .with_context(|| format!("section {i} out of bounds"))?;
        Ok((name, data))
    };
    let (_, names) = section(shstrndx)?;
    for i in 0..shnum {
        let (name, data) = section(i)?;
        let name = names
            .get(name..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return Ok(data
                .split(|&b| b == 0)
                .filter_map(|entry| std::str::from_utf8(entry).ok()?.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect());
        }
    }
    anyhow::bail!("no .modinfo section")
}

/// Soft dependencies from `softdep=` values: (modules to load before, modules to load after).
pub fn softdeps(modinfo: &[(String, String)]) -> (Vec<String>, Vec<String>) {
    let (mut pre, mut post) = (Vec::new(), Vec::new());
    for (_, value) in modinfo.iter().filter(|(k, _)| k == "softdep") {
        let mut into_pre = true;
        for word in value.split_whitespace() {
            match word {
                "pre:" => into_pre = true,
                "post:" => into_pre = false,
                name if into_pre => pre.push(name.to_string()),
                name => post.push(name.to_string()),
            }
        }
    }
    (pre, post)
}

fn bytes<const N: usize>(elf: &[u8], offset: usize) -> Result<[u8; N]> {
    elf.get(offset..offset + N)
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("ELF file truncated at offset {offset}"))
}

fn read_u16(elf: &[u8], offset: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(bytes(elf, offset)?))
}

fn read_u32(elf: &[u8], offset: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(bytes(elf, offset)?))
}

fn read_u64(elf: &[u8], offset: usize) -> Result<u64> {
    Ok(u64::from_le_bytes(bytes(elf, offset)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with three sections: null, .modinfo, .shstrtab.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let modinfo_off = elf.len();
        elf.extend_from_slice(modinfo);
        let strtab_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let shoff = elf.len();
        let mut header = |name: u32, off: usize, size: usize| {
            let mut sh = [0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&sh);
        };
        header(0, 0, 0);
        header(1, modinfo_off, modinfo.len());
        header(10, strtab_off, shstrtab.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn reads_modinfo_and_softdeps() {
        let elf = elf_with_modinfo(
            b"license=GPL\0softdep=pre: crc32c\0\0depends=\0softdep=pre: a post: b c\0",
        );
        let info = parse(&elf).unwrap();
        assert_eq!(info[0], ("license".to_string(), "GPL".to_string()));
        assert_eq!(info.len(), 4);
        assert_eq!(
            softdeps(&info),
            (
                vec!["crc32c".into(), "a".into()],
                vec!["b".into(), "c".into()]
            )
        );
    }

    #[test]
    fn rejects_non_elf_and_truncated_files() {
        assert!(parse(b"\xfd7zXZ\0 compressed").is_err());
        let mut elf = elf_with_modinfo(b"a=b\0");
        elf.truncate(elf.len() - 100);
        assert!(parse(&elf).is_err());
    }
}
