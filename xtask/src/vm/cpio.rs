//! Minimal writer for the cpio "newc" format (the one the kernel unpacks as an initramfs).
//!
//! Every header is 110 ASCII bytes (magic + 13 hex fields), followed by the NUL-terminated name;
//! header+name and the data are each padded to a multiple of 4 bytes. The archive ends with an
//! entry named `TRAILER!!!`. Owner is root, mtime is 0 so the output is reproducible.

use std::io::{self, Read, Write};

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

pub struct Writer<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    /// A directory; `name` is relative to the archive root ("usr/bin").
    pub fn directory(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.header(name, S_IFDIR | (perm & 0o7777), 2, 0)
    }

    /// A regular file of exactly `size` bytes read from `data`.
    pub fn file(
        &mut self,
        name: &str,
        perm: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let size32 = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: larger than 4 GiB"),
            )
        })?;
        self.header(name, S_IFREG | (perm & 0o7777), 1, size32)?;
        let mut buf = [0u8; 64 * 1024];
        let mut remaining = size;
        while remaining > 0 {
            let want = buf
                .len()
                .min(usize::try_from(remaining).unwrap_or(buf.len()));
            let n = data.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{name}: source ended {remaining} bytes early"),
                ));
            }
            self.raw(&buf[..n])?;
            remaining -= n as u64;
        }
        self.pad()
    }

    /// A symbolic link pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        let len = u32::try_from(target.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "symlink target too long"))?;
        self.header(name, S_IFLNK | 0o777, 1, len)?;
        self.raw(target.as_bytes())?;
        self.pad()
    }

    /// Writes the trailer; returns the underlying writer and the archive's size in bytes.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.next_ino = 0;
        self.header(TRAILER, 0, 1, 0)?;
        Ok((self.out, self.offset))
    }

    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: u32) -> io::Result<()> {
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio name {name:?}"),
            ));
        }
        let ino = self.next_ino;
        if ino != 0 {
            self.next_ino += 1;
        }
        let namesize = name.len() + 1;
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let header = format!(
            "{MAGIC}{ino:08X}{mode:08X}{:08X}{:08X}{nlink:08X}{:08X}{size:08X}{:08X}{:08X}{:08X}{:08X}{namesize:08X}{:08X}",
            0, 0, 0, 0, 0, 0, 0, 0
        );
        self.raw(header.as_bytes())?;
        self.raw(name.as_bytes())?;
        self.raw(&[0])?;
        self.pad()
    }

    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = ((4 - self.offset % 4) % 4) as usize;
        self.raw(&[0u8; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back (name, mode, data) triples, checking magic and alignment on the way.
    fn parse(archive: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let align = |x: usize| (x + 3) & !3;
        let field = |h: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                .unwrap()
        };
        let mut pos = 0;
        let mut entries = Vec::new();
        loop {
            assert_eq!(pos % 4, 0, "entry not aligned");
            let h = &archive[pos..pos + 110];
            assert_eq!(&h[..6], MAGIC.as_bytes());
            let mode = field(h, 1);
            let size = field(h, 6) as usize;
            let namesize = field(h, 11) as usize;
            let name = std::str::from_utf8(&archive[pos + 110..pos + 110 + namesize - 1])
                .unwrap()
                .to_string();
            assert_eq!(archive[pos + 110 + namesize - 1], 0);
            let data_start = align(pos + 110 + namesize);
            let data = archive[data_start..data_start + size].to_vec();
            pos = align(data_start + size);
            if name == TRAILER {
                assert_eq!(pos, archive.len());
                return entries;
            }
            entries.push((name, mode, data));
        }
    }

    #[test]
    fn round_trips_directories_files_and_symlinks() {
        let mut w = Writer::new(Vec::new());
        w.directory("bin", 0o755).unwrap();
        w.file("bin/a", 0o755, 5, &mut &b"hello"[..]).unwrap();
        w.file("bin/empty", 0o644, 0, &mut &b""[..]).unwrap();
        w.symlink("bin/sh", "/bin/busybox").unwrap();
        let (archive, size) = w.finish().unwrap();
        assert_eq!(size, archive.len() as u64);
        let entries = parse(&archive);
        assert_eq!(
            entries,
            vec![
                ("bin".to_string(), S_IFDIR | 0o755, vec![]),
                ("bin/a".to_string(), S_IFREG | 0o755, b"hello".to_vec()),
                ("bin/empty".to_string(), S_IFREG | 0o644, vec![]),
                (
                    "bin/sh".to_string(),
                    S_IFLNK | 0o777,
                    b"/bin/busybox".to_vec()
                ),
            ]
        );
    }

    #[test]
    fn short_source_is_an_error() {
        let mut w = Writer::new(Vec::new());
        let err = w.file("f", 0o644, 10, &mut &b"abc"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
