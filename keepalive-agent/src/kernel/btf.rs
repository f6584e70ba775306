//! Queries on the kernel's BTF (`/sys/kernel/btf/vmlinux`): member offsets and sizes by path,
//! enum values by name, tracepoint prototypes.
//!
//! Member lookup descends into anonymous struct and union members (the kernel puts many fields in
//! them, e.g. `sock_common.skc_dport` lives in an anonymous struct inside an anonymous union) and
//! follows typedef, const, volatile, restrict and type-tag chains to reach struct types.

use std::path::{Path, PathBuf};

use btf_rs::{Btf, BtfType, Member, Struct, Type};

/// Depth limit for type chains and anonymous-member descent (kernel types need a handful; the limit
/// only guards against malformed, cyclic BTF).
const MAX_DEPTH: usize = 32;

/// A BTF query failed. Carries the BTF file, and what was looked up.
#[derive(Debug, thiserror::Error)]
#[error("BTF {}: {kind}", path.display())]
pub struct BtfError {
    /// The BTF file the query ran on.
    pub path: PathBuf,
    /// Boxed to keep `Result<_, BtfError>` small.
    pub kind: Box<BtfErrorKind>,
}

/// What went wrong in a BTF query.
#[derive(Debug, thiserror::Error)]
pub enum BtfErrorKind {
    #[error("cannot open or parse: {error}")]
    Open { error: btf_rs::Error },
    #[error("{what}: {error}")]
    Lookup { what: String, error: btf_rs::Error },
    #[error("struct {0} not found")]
    StructNotFound(String),
    #[error("struct {strukt}: no member {path}")]
    MemberNotFound { strukt: String, path: String },
    #[error("struct {strukt}, member path {path}: {component} is a {kind}, not a struct or union")]
    NotComposite { strukt: String, path: String, component: String, kind: &'static str },
    #[error(
        "struct {strukt}: {path} is a bitfield ({bits} bits at bit offset {bit_offset}); \
         it cannot be read as whole bytes"
    )]
    Bitfield { strukt: String, path: String, bits: u32, bit_offset: u64 },
    #[error("struct {strukt}: {path} has a type without a size ({kind})")]
    Unsized { strukt: String, path: String, kind: &'static str },
    #[error("struct {strukt}: {path} has size {size}, expected {expected}")]
    UnexpectedSize { strukt: String, path: String, size: u64, expected: String },
    #[error("struct {strukt}: {path} is at byte {offset}, beyond the 32-bit offsets handed to programs")]
    OffsetRange { strukt: String, path: String, offset: u64 },
    #[error("struct {outer} does not start with an embedded struct {inner} at offset 0: {detail}")]
    NotEmbeddedAtZero { outer: String, inner: String, detail: String },
    #[error("enum {0} not found")]
    EnumNotFound(String),
    #[error("enum {enum_name}: no member {member}")]
    EnumMemberMissing { enum_name: String, member: String },
    #[error("no anonymous enum has the members {0}")]
    AnonEnumNotFound(String),
    #[error("{count} anonymous enums contain {members} but disagree on {member}")]
    AmbiguousEnum { count: usize, members: String, member: String },
    #[error("enum {enum_name}: {member} = {value} is out of range for {target}")]
    EnumValueRange { enum_name: String, member: String, value: i128, target: String },
    #[error("typedef {name}: {detail}")]
    BadTypedef { name: String, detail: String },
    #[error("type chain deeper than {MAX_DEPTH} levels at {0} (malformed BTF?)")]
    TooDeep(String),
}

/// A member's place in a struct: byte offset from the start of the struct, and size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberLoc {
    pub offset: u64,
    pub size: u64,
}

/// An enum with its members, values sign-extended according to the enum's signedness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnumInfo {
    /// Empty for an anonymous enum.
    pub name: String,
    pub members: Vec<(String, i128)>,
}

impl EnumInfo {
    pub fn value(&self, member: &str) -> Option<i128> {
        self.members.iter().find(|(n, _)| n == member).map(|&(_, v)| v)
    }

    /// The value of a member that must exist.
    pub fn require(&self, member: &str) -> Result<i128, BtfErrorKind> {
        self.value(member).ok_or_else(|| BtfErrorKind::EnumMemberMissing {
            enum_name: self.display_name(),
            member: member.to_string(),
        })
    }

    pub fn display_name(&self) -> String {
        if self.name.is_empty() {
            "(anonymous)".to_string()
        } else {
            self.name.clone()
        }
    }
}

/// Parsed kernel BTF plus the file it came from (for error context).
pub struct KernelBtf {
    btf: Btf,
    path: PathBuf,
}

impl KernelBtf {
    /// Parses a BTF file (e.g. `/sys/kernel/btf/vmlinux`) whole.
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_file(path)
            .map_err(|error| BtfError { path: path.to_path_buf(), kind: Box::new(BtfErrorKind::Open { error }) })?;
        Ok(KernelBtf { btf, path: path.to_path_buf() })
    }

    /// Maps a BTF file and reads it on demand where it can be mapped (`/sys/kernel/btf/vmlinux`
    /// since Linux 6.16; a regular file), else parses it whole: a third of the start-up CPU time
    /// and no heap for the parsed types, for the one-shot `audit`. (The daemons parse it whole:
    /// the heap it frees is what their first allocations reuse.)
    pub fn from_file_mapped(path: &Path) -> Result<Self, BtfError> {
        let btf = match Btf::from_file_with_backend(path, btf_rs::Backend::Mmap) {
            Ok(btf) => Ok(btf),
            Err(e) => {
                log::debug!("{}: not mapped ({e}), parsing it whole", path.display());
                Btf::from_file(path)
            }
        }
        .map_err(|error| BtfError { path: path.to_path_buf(), kind: Box::new(BtfErrorKind::Open { error }) })?;
        Ok(KernelBtf { btf, path: path.to_path_buf() })
    }

    /// Parses BTF from memory; `label` names it in errors.
    pub fn from_bytes(bytes: &[u8], label: &Path) -> Result<Self, BtfError> {
        let btf = Btf::from_bytes(bytes)
            .map_err(|error| BtfError { path: label.to_path_buf(), kind: Box::new(BtfErrorKind::Open { error }) })?;
        Ok(KernelBtf { btf, path: label.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wraps an error kind with this BTF's path.
    pub fn err(&self, kind: BtfErrorKind) -> BtfError {
        BtfError { path: self.path.clone(), kind: Box::new(kind) }
    }

    fn lookup_err(&self, what: impl Into<String>) -> impl FnOnce(btf_rs::Error) -> BtfError + '_ {
        let what = what.into();
        move |error| self.err(BtfErrorKind::Lookup { what, error })
    }

    fn name_of(&self, t: &dyn BtfType, what: &str) -> Result<String, BtfError> {
        self.btf.resolve_name(t).map_err(self.lookup_err(format!("name of {what}")))
    }

    fn type_by_id(&self, id: u32, what: &str) -> Result<Type, BtfError> {
        self.btf.resolve_type_by_id(id).map_err(self.lookup_err(format!("type of {what}")))
    }

    /// Follows typedef / const / volatile / restrict / type-tag links to the underlying type.
    fn strip_modifiers(&self, mut ty: Type, what: &str) -> Result<Type, BtfError> {
        for _ in 0..MAX_DEPTH {
            let next = match &ty {
                Type::Typedef(t) => t.get_type_id(),
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => t.get_type_id(),
                Type::TypeTag(t) => t.get_type_id(),
                _ => return Ok(ty),
            };
            ty = match next {
                // `const void` and friends.
                Some(0) | None => Type::Void,
                Some(id) => self.type_by_id(id, what)?,
            };
        }
        Err(self.err(BtfErrorKind::TooDeep(what.to_string())))
    }

    /// Size in bytes of a type, `None` when it has none (void, function, forward declaration).
    fn type_size(&self, ty: &Type, what: &str) -> Result<Option<u64>, BtfError> {
        let ty = self.strip_modifiers(ty.clone(), what)?;
        Ok(match &ty {
            Type::Int(t) => Some(t.size() as u64),
            Type::Enum(t) => Some(t.size() as u64),
            Type::Enum64(t) => Some(t.size() as u64),
            Type::Struct(t) | Type::Union(t) => Some(t.size() as u64),
            Type::Float(t) => Some(t.size() as u64),
            // BTF does not record pointer width; the agent runs on the kernel's architecture.
            Type::Ptr(_) => Some(std::mem::size_of::<usize>() as u64),
            Type::Array(a) => {
                let elem = match a.get_type_id() {
                    Some(id) => self.type_by_id(id, what)?,
                    None => return Ok(None),
                };
                self.type_size(&elem, what)?.map(|s| s * a.len() as u64)
            }
            _ => None,
        })
    }

    /// The struct named `name` (not a union, not a forward declaration).
    pub fn struct_named(&self, name: &str) -> Result<Struct, BtfError> {
        let types = self.btf.resolve_types_by_name(name).map_err(self.lookup_err(format!("struct {name}")))?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .ok_or_else(|| self.err(BtfErrorKind::StructNotFound(name.to_string())))
    }

    /// Size of struct `name` in bytes.
    pub fn struct_size(&self, name: &str) -> Result<u64, BtfError> {
        Ok(self.struct_named(name)?.size() as u64)
    }

    /// Finds member `name` in `s`, directly or inside anonymous struct/union members (recursively).
    /// Returns the member and its bit offset from the start of `s`.
    fn find_member(&self, s: &Struct, name: &str, depth: usize) -> Result<Option<(u64, Member)>, BtfError> {
        if depth > MAX_DEPTH {
            return Err(self.err(BtfErrorKind::TooDeep(format!("anonymous members around {name}"))));
        }
        for m in &s.members {
            let mname = self.name_of(m, "struct member")?;
            if mname == name {
                return Ok(Some((m.bit_offset() as u64, m.clone())));
            }
            if mname.is_empty() {
                let Some(id) = m.get_type_id() else { continue };
                let ty = self.strip_modifiers(self.type_by_id(id, "anonymous member")?, name)?;
                if let Type::Struct(inner) | Type::Union(inner) = ty {
                    if let Some((off, found)) = self.find_member(&inner, name, depth + 1)? {
                        return Ok(Some((m.bit_offset() as u64 + off, found)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Byte offset and size of the member at `path` (dot-separated, e.g. `__sk_common.skc_family`)
    /// in struct `strukt`. `Ok(None)` when some component does not exist. Anonymous members are
    /// looked through; a bitfield or a non-byte-aligned member is an error.
    pub fn member(&self, strukt: &str, path: &str) -> Result<Option<MemberLoc>, BtfError> {
        let mut current = self.struct_named(strukt)?;
        let components: Vec<&str> = path.split('.').collect();
        let mut bit_offset: u64 = 0;
        for (i, component) in components.iter().enumerate() {
            let Some((off, member)) = self.find_member(&current, component, 0)? else {
                return Ok(None);
            };
            bit_offset += off;
            let what = format!("{strukt}.{}", components[..=i].join("."));
            let ty = match member.get_type_id() {
                Some(id) => self.type_by_id(id, &what)?,
                None => Type::Void,
            };
            let last = i + 1 == components.len();
            if last {
                let bits = member.bitfield_size().unwrap_or(0);
                if bits != 0 || !bit_offset.is_multiple_of(8) {
                    return Err(self.err(BtfErrorKind::Bitfield {
                        strukt: strukt.to_string(),
                        path: path.to_string(),
                        bits,
                        bit_offset,
                    }));
                }
                let Some(size) = self.type_size(&ty, &what)? else {
                    return Err(self.err(BtfErrorKind::Unsized {
                        strukt: strukt.to_string(),
                        path: path.to_string(),
                        kind: self.strip_modifiers(ty, &what)?.name(),
                    }));
                };
                return Ok(Some(MemberLoc { offset: bit_offset / 8, size }));
            }
            current = match self.strip_modifiers(ty, &what)? {
                Type::Struct(s) | Type::Union(s) => s,
                other => {
                    return Err(self.err(BtfErrorKind::NotComposite {
                        strukt: strukt.to_string(),
                        path: path.to_string(),
                        component: component.to_string(),
                        kind: other.name(),
                    }))
                }
            };
        }
        // `split` yields at least one component, and the loop returns on the last one.
        Ok(None)
    }

    /// Checks that struct `outer` embeds struct `inner` as a member at offset 0, so that offsets
    /// of `outer`'s members are also offsets from the start of `inner` (e.g. `tcp_sock` starts
    /// with `inet_connection_sock`).
    pub fn check_embedded_at_zero(&self, outer: &str, inner: &str) -> Result<(), BtfError> {
        let s = self.struct_named(outer)?;
        let fail = |detail: String| {
            self.err(BtfErrorKind::NotEmbeddedAtZero { outer: outer.to_string(), inner: inner.to_string(), detail })
        };
        for m in &s.members {
            let Some(id) = m.get_type_id() else { continue };
            let ty = self.strip_modifiers(self.type_by_id(id, outer)?, outer)?;
            let Type::Struct(t) = ty else { continue };
            if self.name_of(&t, "struct")? != inner {
                continue;
            }
            let mname = self.name_of(m, "struct member")?;
            if m.bit_offset() != 0 {
                return Err(fail(format!("member {mname} is at bit offset {}", m.bit_offset())));
            }
            log::debug!("BTF: struct {outer} starts with struct {inner} {mname} at offset 0");
            return Ok(());
        }
        Err(fail("no member of that type".to_string()))
    }

    fn enum_info(&self, ty: &Type) -> Result<Option<EnumInfo>, BtfError> {
        Ok(match ty {
            Type::Enum(e) => {
                let mut members = Vec::with_capacity(e.members.len());
                for m in &e.members {
                    let v = if e.is_signed() { m.val() as i32 as i128 } else { m.val() as i128 };
                    members.push((self.name_of(m, "enum member")?, v));
                }
                Some(EnumInfo { name: self.name_of(e, "enum")?, members })
            }
            Type::Enum64(e) => {
                let mut members = Vec::with_capacity(e.members.len());
                for m in &e.members {
                    let v = if e.is_signed() { m.val() as i64 as i128 } else { m.val() as i128 };
                    members.push((self.name_of(m, "enum member")?, v));
                }
                Some(EnumInfo { name: self.name_of(e, "enum")?, members })
            }
            _ => None,
        })
    }

    /// The enum named `name`; `Ok(None)` when the kernel has none.
    pub fn named_enum(&self, name: &str) -> Result<Option<EnumInfo>, BtfError> {
        let types = self.btf.resolve_types_by_name(name).map_err(self.lookup_err(format!("enum {name}")))?;
        for t in &types {
            if let Some(info) = self.enum_info(t)? {
                return Ok(Some(info));
            }
        }
        Ok(None)
    }

    /// Every anonymous enum (the kernel declares TCP states and `IPPROTO_*` that way).
    pub fn anonymous_enums(&self) -> Result<Vec<EnumInfo>, BtfError> {
        let ids = self.btf.resolve_ids_by_name("").map_err(self.lookup_err("anonymous types"))?;
        let mut out = Vec::new();
        for id in ids {
            let t = self.type_by_id(id, "anonymous type")?;
            if matches!(t, Type::Enum(_) | Type::Enum64(_)) {
                if let Some(info) = self.enum_info(&t)? {
                    out.push(info);
                }
            }
        }
        Ok(out)
    }

    /// Index of the parameter named `param` of function `name` (from its BTF prototype, which
    /// is the signature the kernel's trampolines and registers follow). `Ok(None)` when the
    /// function or the parameter is absent.
    pub fn func_param_index(&self, name: &str, param: &str) -> Result<Option<usize>, BtfError> {
        let types = self.btf.resolve_types_by_name(name).map_err(self.lookup_err(format!("function {name}")))?;
        let Some(Type::Func(func)) = types.into_iter().find(|t| matches!(t, Type::Func(_))) else {
            return Ok(None);
        };
        let bad = |detail: String| self.err(BtfErrorKind::BadTypedef { name: name.to_string(), detail });
        match func.get_type_id().map(|id| self.type_by_id(id, name)) {
            Some(Ok(Type::FuncProto(p))) => {
                for (i, prm) in p.parameters.iter().enumerate() {
                    if !prm.is_variadic() && self.name_of(prm, "parameter")? == param {
                        return Ok(Some(i));
                    }
                }
                Ok(None)
            }
            Some(Ok(other)) => Err(bad(format!("function type is a {}, expected a prototype", other.name()))),
            Some(Err(e)) => Err(e),
            None => Err(bad("function without a type".into())),
        }
    }

    /// Number of parameters of the function prototype that typedef `name` points to (e.g.
    /// `btf_trace_tcp_send_reset`, whose first parameter is the tracepoint context). `Ok(None)`
    /// when there is no such typedef.
    pub fn typedef_func_proto_params(&self, name: &str) -> Result<Option<usize>, BtfError> {
        let types = self.btf.resolve_types_by_name(name).map_err(self.lookup_err(format!("typedef {name}")))?;
        let Some(td) = types.into_iter().find(|t| matches!(t, Type::Typedef(_))) else {
            return Ok(None);
        };
        let bad = |detail: String| self.err(BtfErrorKind::BadTypedef { name: name.to_string(), detail });
        let ptr = self.strip_modifiers(td, name)?;
        let Type::Ptr(ptr) = ptr else {
            return Err(bad(format!("is a {}, expected a function pointer", ptr.name())));
        };
        let target = match ptr.get_type_id() {
            Some(id) if id != 0 => self.strip_modifiers(self.type_by_id(id, name)?, name)?,
            _ => Type::Void,
        };
        match target {
            Type::FuncProto(p) => Ok(Some(p.parameters.iter().filter(|param| !param.is_variadic()).count())),
            other => Err(bad(format!("points to a {}, expected a function prototype", other.name()))),
        }
    }
}

/// Picks the anonymous enum that contains all of `required` (e.g. `TCP_ESTABLISHED` and
/// `TCP_LISTEN`: other anonymous enums also have `TCP_`-prefixed names, like `TCP_NO_QUEUE` or
/// `TCP_MIB_*`, but not those two). When several qualify, they must agree on every member whose
/// name passes `relevant`, or the choice would be a guess.
pub fn pick_anonymous_enum<'a>(
    enums: &'a [EnumInfo],
    required: &[&str],
    relevant: impl Fn(&str) -> bool,
) -> Result<&'a EnumInfo, BtfErrorKind> {
    let candidates: Vec<&EnumInfo> = enums.iter().filter(|e| required.iter().all(|r| e.value(r).is_some())).collect();
    let Some(first) = candidates.first() else {
        return Err(BtfErrorKind::AnonEnumNotFound(required.join(", ")));
    };
    for other in &candidates[1..] {
        for (name, value) in first.members.iter().chain(other.members.iter()) {
            if !relevant(name) {
                continue;
            }
            if first.value(name) != other.value(name) {
                return Err(BtfErrorKind::AmbiguousEnum {
                    count: candidates.len(),
                    members: required.join(", "),
                    member: format!("{name} (one says {value})"),
                });
            }
        }
    }
    Ok(first)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a small BTF blob by hand (little-endian), so the lookup logic can be tested on
    /// known layouts without a kernel.
    #[derive(Default)]
    pub struct BtfBuilder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    const KIND_INT: u32 = 1;
    const KIND_PTR: u32 = 2;
    const KIND_STRUCT: u32 = 4;
    const KIND_UNION: u32 = 5;
    const KIND_ENUM: u32 = 6;
    const KIND_TYPEDEF: u32 = 8;
    const KIND_VOLATILE: u32 = 9;
    const KIND_FUNC_PROTO: u32 = 13;

    impl BtfBuilder {
        pub fn new() -> Self {
            BtfBuilder { types: Vec::new(), strings: vec![0], next_id: 1 }
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn u32(&mut self, v: u32) {
            self.types.extend_from_slice(&v.to_le_bytes());
        }

        fn header(&mut self, name: &str, kind: u32, kflag: bool, vlen: u32, size_type: u32) -> u32 {
            let name_off = self.str(name);
            self.u32(name_off);
            self.u32((kflag as u32) << 31 | kind << 24 | vlen);
            self.u32(size_type);
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        pub fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.header(name, KIND_INT, false, 0, size);
            self.u32(size * 8);
            id
        }

        pub fn ptr(&mut self, to: u32) -> u32 {
            self.header("", KIND_PTR, false, 0, to)
        }

        pub fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.header(name, KIND_TYPEDEF, false, 0, to)
        }

        pub fn volatile(&mut self, to: u32) -> u32 {
            self.header("", KIND_VOLATILE, false, 0, to)
        }

        /// Members: (name, type, bit offset, bitfield size). Uses kind_flag encoding.
        pub fn composite(&mut self, union: bool, name: &str, size: u32, members: &[(&str, u32, u32, u32)]) -> u32 {
            let kind = if union { KIND_UNION } else { KIND_STRUCT };
            let id = self.header(name, kind, true, members.len() as u32, size);
            for &(mname, ty, bit_off, bits) in members {
                let off = self.str(mname);
                self.u32(off);
                self.u32(ty);
                self.u32(bits << 24 | bit_off);
            }
            id
        }

        pub fn enumeration(&mut self, name: &str, signed: bool, members: &[(&str, i32)]) -> u32 {
            let id = self.header(name, KIND_ENUM, signed, members.len() as u32, 4);
            for &(mname, v) in members {
                let off = self.str(mname);
                self.u32(off);
                self.u32(v as u32);
            }
            id
        }

        pub fn func_proto(&mut self, ret: u32, params: &[u32]) -> u32 {
            let id = self.header("", KIND_FUNC_PROTO, false, params.len() as u32, ret);
            for &p in params {
                self.u32(0);
                self.u32(p);
            }
            id
        }

        pub fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&0xeb9fu16.to_le_bytes());
            out.push(1); // version
            out.push(0); // flags
            out.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
            out.extend_from_slice(&0u32.to_le_bytes()); // type_off
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes()); // str_off
            out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A `sock_common`-like layout: the ports and addresses are in anonymous structs inside
    /// anonymous unions, one of them two levels deep, and the state is volatile behind a typedef.
    fn sample() -> KernelBtf {
        let mut b = BtfBuilder::new();
        let u8_ = b.int("u8", 1);
        let u16_ = b.int("u16", 2);
        let u32_ = b.int("u32", 4);
        let u64_ = b.int("u64", 8);
        let vol_u8 = b.volatile(u8_);
        let state_t = b.typedef("state_t", vol_u8);
        let ports = b.composite(false, "", 4, &[("dport", u16_, 0, 0), ("num", u16_, 16, 0)]);
        let inner_union = b.composite(true, "", 4, &[("portpair", u32_, 0, 0), ("", ports, 0, 0)]);
        let deep = b.composite(false, "", 8, &[("pad", u32_, 0, 0), ("", inner_union, 32, 0)]);
        let outer_union = b.composite(true, "", 8, &[("pair", u64_, 0, 0), ("", deep, 0, 0)]);
        let common = b.composite(
            false,
            "common",
            16,
            &[
                ("", outer_union, 0, 0),
                ("family", u16_, 64, 0),
                ("state", state_t, 80, 0),
                ("reuse", u8_, 88, 4),
                ("odd", u8_, 92, 0),
            ],
        );
        let common_t = b.typedef("common_t", common);
        let ptr = b.ptr(common);
        b.composite(false, "outer", 40, &[("c", common_t, 0, 0), ("link", ptr, 128, 0), ("count", u32_, 192, 0)]);
        b.composite(false, "wrapper", 48, &[("base", common, 0, 0), ("x", u64_, 320, 0)]);
        b.composite(false, "misplaced", 48, &[("x", u64_, 0, 0), ("base", common, 64, 0)]);
        b.enumeration("", false, &[("TCP_NO_QUEUE", 0), ("TCP_RECV_QUEUE", 1)]);
        b.enumeration("", false, &[("TCP_ESTABLISHED", 1), ("TCP_CLOSE", 7), ("TCP_LISTEN", 10)]);
        b.enumeration("flags", false, &[("F_DEAD", 0), ("F_KEEPOPEN", 3)]);
        b.enumeration("neg", true, &[("N", -1)]);
        b.enumeration("big", false, &[("B", -1)]);
        let vptr = b.ptr(0);
        let proto = b.func_proto(0, &[vptr, ptr, ptr]);
        let fptr = b.ptr(proto);
        b.typedef("btf_trace_three", fptr);
        b.typedef("not_a_fn", u32_);
        KernelBtf::from_bytes(&b.build(), Path::new("sample.btf")).expect("sample BTF parses")
    }

    fn loc(offset: u64, size: u64) -> Option<MemberLoc> {
        Some(MemberLoc { offset, size })
    }

    #[test]
    fn anonymous_members_are_searched_recursively() {
        let btf = sample();
        // pair@0 | { pad@0, { portpair@4 | { dport@4, num@6 } } }
        assert_eq!(btf.member("common", "pair").unwrap(), loc(0, 8));
        assert_eq!(btf.member("common", "portpair").unwrap(), loc(4, 4));
        assert_eq!(btf.member("common", "dport").unwrap(), loc(4, 2));
        assert_eq!(btf.member("common", "num").unwrap(), loc(6, 2));
        assert_eq!(btf.member("common", "family").unwrap(), loc(8, 2));
        // typedef -> volatile -> u8
        assert_eq!(btf.member("common", "state").unwrap(), loc(10, 1));
        // Through a typedef'd embedded struct, then anonymous members again.
        assert_eq!(btf.member("outer", "c.num").unwrap(), loc(6, 2));
        assert_eq!(btf.member("outer", "link").unwrap(), loc(16, 8));
        assert_eq!(btf.member("outer", "count").unwrap(), loc(24, 4));
        assert_eq!(btf.member("outer", "c").unwrap(), loc(0, 16));
    }

    #[test]
    fn missing_members_and_structs() {
        let btf = sample();
        assert_eq!(btf.member("common", "nope").unwrap(), None);
        assert_eq!(btf.member("outer", "c.nope").unwrap(), None);
        let err = btf.member("nosuch", "x").unwrap_err();
        assert!(matches!(*err.kind, BtfErrorKind::StructNotFound(ref s) if s == "nosuch"), "{err}");
        assert!(err.to_string().contains("sample.btf"), "{err}");
        // Descending through a scalar.
        let err = btf.member("outer", "count.x").unwrap_err();
        assert!(matches!(*err.kind, BtfErrorKind::NotComposite { .. }), "{err}");
        // A pointer is not followed: its target is another object.
        let err = btf.member("outer", "link.family").unwrap_err();
        assert!(matches!(*err.kind, BtfErrorKind::NotComposite { kind: "ptr", .. }), "{err}");
    }

    #[test]
    fn bitfields_are_refused_with_their_name() {
        let btf = sample();
        let err = btf.member("common", "reuse").unwrap_err();
        match &*err.kind {
            BtfErrorKind::Bitfield { path, bits, bit_offset, .. } => {
                assert_eq!(path, "reuse");
                assert_eq!(*bits, 4);
                assert_eq!(*bit_offset, 88);
            }
            other => panic!("unexpected {other}"),
        }
        assert!(err.to_string().contains("common: reuse is a bitfield"), "{err}");
        // Not a bitfield, but not on a byte boundary either.
        assert!(matches!(*btf.member("common", "odd").unwrap_err().kind, BtfErrorKind::Bitfield { .. }));
    }

    #[test]
    fn embedded_at_zero() {
        let btf = sample();
        btf.check_embedded_at_zero("wrapper", "common").unwrap();
        let err = btf.check_embedded_at_zero("misplaced", "common").unwrap_err();
        assert!(err.to_string().contains("bit offset 64"), "{err}");
        let err = btf.check_embedded_at_zero("outer", "wrapper").unwrap_err();
        assert!(matches!(*err.kind, BtfErrorKind::NotEmbeddedAtZero { .. }), "{err}");
    }

    #[test]
    fn enums_by_name_and_anonymous_choice() {
        let btf = sample();
        let flags = btf.named_enum("flags").unwrap().unwrap();
        assert_eq!(flags.value("F_KEEPOPEN"), Some(3));
        assert_eq!(flags.value("F_DEAD"), Some(0));
        assert!(btf.named_enum("nope").unwrap().is_none());
        // Values follow the enum's signedness.
        assert_eq!(btf.named_enum("neg").unwrap().unwrap().value("N"), Some(-1));
        assert_eq!(btf.named_enum("big").unwrap().unwrap().value("B"), Some(u32::MAX as i128));

        let anon = btf.anonymous_enums().unwrap();
        assert_eq!(anon.len(), 2);
        let tcp = pick_anonymous_enum(&anon, &["TCP_ESTABLISHED", "TCP_LISTEN"], |n| n.starts_with("TCP_")).unwrap();
        assert_eq!(tcp.value("TCP_CLOSE"), Some(7));
        assert_eq!(tcp.value("TCP_NO_QUEUE"), None);
        let err = pick_anonymous_enum(&anon, &["TCP_FOO"], |_| true).unwrap_err();
        assert!(matches!(err, BtfErrorKind::AnonEnumNotFound(_)));

        // Two candidates that disagree are refused.
        let a = EnumInfo { name: String::new(), members: vec![("X".into(), 1), ("Y".into(), 2)] };
        let b = EnumInfo { name: String::new(), members: vec![("X".into(), 1), ("Y".into(), 3)] };
        let both = [a.clone(), b];
        assert!(matches!(pick_anonymous_enum(&both, &["X"], |_| true), Err(BtfErrorKind::AmbiguousEnum { .. })));
        // ... unless the disagreement is about irrelevant members.
        assert_eq!(pick_anonymous_enum(&both, &["X"], |n| n == "X").unwrap(), &a);
    }

    #[test]
    fn tracepoint_typedef_params() {
        let btf = sample();
        assert_eq!(btf.typedef_func_proto_params("btf_trace_three").unwrap(), Some(3));
        assert_eq!(btf.typedef_func_proto_params("btf_trace_none").unwrap(), None);
        let err = btf.typedef_func_proto_params("not_a_fn").unwrap_err();
        assert!(matches!(*err.kind, BtfErrorKind::BadTypedef { .. }), "{err}");
    }

    #[test]
    fn garbage_is_a_parse_error_naming_the_source() {
        let err = KernelBtf::from_bytes(b"not btf at all, certainly", Path::new("junk.btf"))
            .err()
            .expect("garbage must not parse");
        assert!(matches!(*err.kind, BtfErrorKind::Open { .. }), "{err}");
        assert!(err.to_string().contains("junk.btf"), "{err}");
    }
}
