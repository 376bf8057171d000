//! A minimal reader of raw BTF: just enough to find the byte offset of a struct member, and
//! whether the kernel has a tracepoint (with how many arguments) or a function.
//!
//! Why not a full BTF library: parsing every one of vmlinux's ~150,000 types into owned
//! structures took 41 MB at peak (btf-rs, measured on 6.18), and left 14 MB the allocator never
//! returned, in a daemon whose whole budget is 32 MiB. This reader walks the type section in
//! place and keeps one 4-byte index entry per type. The bytes are the kernel's, but a truncated
//! or corrupt file must still give an error, never a panic: every read is bounds-checked.
//!
//! Format: <https://docs.kernel.org/bpf/btf.html> (header, type section, string section).

/// Errors name what is wrong with the data; callers add the path.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RawBtfError {
    #[error("not BTF data (magic {0:#06x}, expected 0xeb9f in native byte order)")]
    BadMagic(u16),
    #[error("BTF data is truncated ({0})")]
    Truncated(&'static str),
    #[error("BTF type {id} has unknown kind {kind}")]
    UnknownKind { id: usize, kind: u32 },
}

const MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
const TYPE_HEADER_LEN: usize = 12;
/// Most aggregates one member search visits (task_struct's nesting needs a few dozen).
const SEARCH_BUDGET: u32 = 4096;

// Kinds (include/uapi/linux/btf.h) this reader needs by name.
const KIND_PTR: u32 = 2;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// Type ids are 1-based (0 is void); `index[id - 1]` is the record's offset in `types`.
pub struct RawBtf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    index: Vec<u32>,
}

/// One type record's fixed part.
#[derive(Clone, Copy)]
struct TypeHeader {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// `size` for structs and unions, the referenced type id for typedefs and qualifiers.
    size_or_type: u32,
}

/// Where a member sits in its outermost struct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberBits {
    pub bit_offset: u64,
    pub bitfield: bool,
}

impl<'a> RawBtf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, RawBtfError> {
        let magic = read_u16(data, 0).ok_or(RawBtfError::Truncated("header"))?;
        if magic != MAGIC {
            return Err(RawBtfError::BadMagic(magic));
        }
        let field = |at: usize| read_u32(data, at).ok_or(RawBtfError::Truncated("header"));
        let hdr_len = field(4)? as usize;
        let (type_off, type_len) = (field(8)? as usize, field(12)? as usize);
        let (str_off, str_len) = (field(16)? as usize, field(20)? as usize);
        if hdr_len < HEADER_LEN {
            return Err(RawBtfError::Truncated("header length"));
        }
        let section = |off: usize, len: usize, what| {
            let start = hdr_len.checked_add(off);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) => data.get(s..e).ok_or(RawBtfError::Truncated(what)),
                _ => Err(RawBtfError::Truncated(what)),
            }
        };
        let types = section(type_off, type_len, "type section")?;
        let strings = section(str_off, str_len, "string section")?;
        let mut btf = Self {
            types,
            strings,
            index: Vec::new(),
        };
        btf.build_index()?;
        Ok(btf)
    }

    fn build_index(&mut self) -> Result<(), RawBtfError> {
        let mut at = 0usize;
        while at < self.types.len() {
            let id = self.index.len() + 1;
            let header = header_at(self.types, at).ok_or(RawBtfError::Truncated("type record"))?;
            let extra = trailing_len(header).ok_or(RawBtfError::UnknownKind {
                id,
                kind: header.kind,
            })?;
            let offset = u32::try_from(at).map_err(|_| RawBtfError::Truncated("type section"))?;
            self.index.push(offset);
            at = at
                .checked_add(TYPE_HEADER_LEN + extra)
                .filter(|end| *end <= self.types.len())
                .ok_or(RawBtfError::Truncated("type record"))?;
        }
        Ok(())
    }

    fn header(&self, id: u32) -> Option<TypeHeader> {
        let at = *self.index.get((id as usize).checked_sub(1)?)?;
        header_at(self.types, at as usize)
    }

    fn name(&self, name_off: u32) -> &'a [u8] {
        let rest = self.strings.get(name_off as usize..).unwrap_or_default();
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    /// The id of the struct named `name` that has members (a definition, not a forward
    /// declaration or an empty placeholder).
    pub fn struct_by_name(&self, name: &str) -> Option<u32> {
        (1..=self.index.len() as u32).find(|&id| {
            self.header(id).is_some_and(|h| {
                h.kind == KIND_STRUCT && h.vlen > 0 && self.name(h.name_off) == name.as_bytes()
            })
        })
    }

    /// The first type of kind `kind` named `name`.
    fn type_by_name(&self, kind: u32, name: &str) -> Option<TypeHeader> {
        (1..=self.index.len() as u32)
            .filter_map(|id| self.header(id))
            .find(|h| h.kind == kind && self.name(h.name_off) == name.as_bytes())
    }

    /// How many arguments tracepoint `name` passes (its `btf_trace_<name>` typedef: a pointer
    /// to a function whose first parameter is the program context), or None if this kernel
    /// has no such tracepoint. tp_btf programs can read only that many.
    pub fn tracepoint_args(&self, name: &str) -> Option<usize> {
        let typedef = self.type_by_name(KIND_TYPEDEF, &format!("btf_trace_{name}"))?;
        let pointer = self.header(typedef.size_or_type)?;
        if pointer.kind != KIND_PTR {
            return None;
        }
        let proto = self.header(pointer.size_or_type)?;
        (proto.kind == KIND_FUNC_PROTO).then(|| proto.vlen.saturating_sub(1))
    }

    /// Whether the kernel has a function `name` in its BTF: what an fentry program attaches to.
    pub fn has_function(&self, name: &str) -> bool {
        self.type_by_name(KIND_FUNC, name).is_some()
    }

    /// Where `member` sits in the struct or union `id`, looking through anonymous struct and
    /// union members (task_struct nests many of its members in them, depending on config).
    pub fn member_bits(&self, id: u32, member: &str) -> Option<MemberBits> {
        let mut budget = SEARCH_BUDGET;
        self.member_bits_at_depth(id, member, 0, &mut budget)
    }

    fn member_bits_at_depth(
        &self,
        id: u32,
        member: &str,
        depth: u32,
        budget: &mut u32,
    ) -> Option<MemberBits> {
        // Kernel types nest anonymous aggregates a few levels deep; a cycle is corrupt data,
        // and so is a search that visits more aggregates than any real struct has (corrupt
        // data can make every anonymous member point back: exponential without a budget).
        if depth > 16 || *budget == 0 {
            return None;
        }
        *budget -= 1;
        let header = self.header(id)?;
        if header.kind != KIND_STRUCT && header.kind != KIND_UNION {
            return None;
        }
        let base = *self.index.get(id as usize - 1)? as usize + TYPE_HEADER_LEN;
        for i in 0..header.vlen {
            let at = base + i * 12;
            let (name_off, ty, raw) = (
                read_u32(self.types, at)?,
                read_u32(self.types, at + 4)?,
                read_u32(self.types, at + 8)?,
            );
            // With kind_flag set, the top 8 bits are the bitfield size; else all bits are offset.
            let (bit_offset, bitfield) = if header.kind_flag {
                (u64::from(raw & 0x00ff_ffff), raw >> 24 != 0)
            } else {
                (u64::from(raw), false)
            };
            let name = self.name(name_off);
            if name == member.as_bytes() {
                return Some(MemberBits {
                    bit_offset,
                    bitfield,
                });
            }
            if name.is_empty()
                && let Some(inner) = self.aggregate_of(ty)
                && let Some(found) = self.member_bits_at_depth(inner, member, depth + 1, budget)
            {
                return Some(MemberBits {
                    bit_offset: bit_offset + found.bit_offset,
                    bitfield: found.bitfield,
                });
            }
        }
        None
    }

    /// The struct or union type `id` resolves to, through typedefs and qualifiers.
    fn aggregate_of(&self, mut id: u32) -> Option<u32> {
        for _ in 0..16 {
            let header = self.header(id)?;
            match header.kind {
                KIND_STRUCT | KIND_UNION => return Some(id),
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = header.size_or_type;
                }
                _ => return None,
            }
        }
        None
    }
}

fn header_at(types: &[u8], at: usize) -> Option<TypeHeader> {
    let info = read_u32(types, at + 4)?;
    Some(TypeHeader {
        name_off: read_u32(types, at)?,
        kind: (info >> 24) & 0x1f,
        vlen: (info & 0xffff) as usize,
        kind_flag: info >> 31 != 0,
        size_or_type: read_u32(types, at + 8)?,
    })
}

/// Bytes that follow a type record's fixed part, by kind; `None` for a kind this reader does
/// not know (its length is unknown, so nothing after it can be found).
fn trailing_len(header: TypeHeader) -> Option<usize> {
    let vlen = header.vlen;
    Some(match header.kind {
        1 => 4,                    // INT: encoding
        2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
        3 => 12,                   // ARRAY: btf_array
        4 | 5 => 12 * vlen,        // STRUCT, UNION: btf_member
        6 => 8 * vlen,             // ENUM: btf_enum
        13 => 8 * vlen,            // FUNC_PROTO: btf_param
        14 | 17 => 4,              // VAR: linkage; DECL_TAG: component_idx
        15 => 12 * vlen,           // DATASEC: btf_var_secinfo
        19 => 12 * vlen,           // ENUM64: btf_enum64
        _ => return None,
    })
}

fn read_u16(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        data.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds BTF blobs for tests: types are appended in id order, names interned.
    #[derive(Default)]
    pub struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        pub fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }

        fn name(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }

        fn record(&mut self, name: &str, kind: u32, vlen: u32, flag: bool, size_or_type: u32) {
            let name = self.name(name);
            let info = (u32::from(flag) << 31) | (kind << 24) | vlen;
            for word in [name, info, size_or_type] {
                self.types.extend_from_slice(&word.to_ne_bytes());
            }
        }

        pub fn int(&mut self, name: &str, size: u32) {
            self.record(name, 1, 0, false, size);
            self.types.extend_from_slice(&(size * 8).to_ne_bytes());
        }

        pub fn typedef(&mut self, name: &str, target: u32) {
            self.record(name, KIND_TYPEDEF, 0, false, target);
        }

        pub fn pointer(&mut self, target: u32) {
            self.record("", KIND_PTR, 0, false, target);
        }

        /// A function prototype with `params` parameters of type `param_type`.
        pub fn func_proto(&mut self, params: u32, param_type: u32) {
            self.record("", KIND_FUNC_PROTO, params, false, 0);
            for _ in 0..params {
                self.types.extend_from_slice(&0u32.to_ne_bytes());
                self.types.extend_from_slice(&param_type.to_ne_bytes());
            }
        }

        pub fn func(&mut self, name: &str, proto: u32) {
            self.record(name, KIND_FUNC, 0, false, proto);
        }

        /// A struct (or union) with (name, type id, bit offset, bitfield size) members.
        pub fn aggregate(&mut self, kind: u32, name: &str, members: &[(&str, u32, u32, u32)]) {
            let flag = members.iter().any(|m| m.3 != 0);
            self.record(name, kind, members.len() as u32, flag, 64);
            for &(member, ty, bits, bitfield) in members {
                let off = self.name(member);
                let raw = if flag { (bitfield << 24) | bits } else { bits };
                for word in [off, ty, raw] {
                    self.types.extend_from_slice(&word.to_ne_bytes());
                }
            }
        }

        pub fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_ne_bytes());
            out.extend_from_slice(&[1, 0]);
            let (types, strings) = (self.types.len() as u32, self.strings.len() as u32);
            for word in [HEADER_LEN as u32, 0, types, types, strings] {
                out.extend_from_slice(&word.to_ne_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// struct outer { int a; union { int b; struct { int c; int d:3; }; }; };  plus a forward
    /// declaration named `outer` first, the way vmlinux lists some names more than once.
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        b.aggregate(KIND_STRUCT, "outer", &[]); // 1: empty, must be skipped
        b.int("int", 4); // 2
        b.aggregate(KIND_STRUCT, "", &[("c", 2, 0, 0), ("d", 2, 32, 3)]); // 3
        b.typedef("inner_t", 3); // 4
        b.aggregate(KIND_UNION, "", &[("b", 2, 0, 0), ("", 4, 0, 0)]); // 5
        b.aggregate(KIND_STRUCT, "outer", &[("a", 2, 0, 0), ("", 5, 64, 0)]); // 6
        b.build()
    }

    #[test]
    fn finds_members_through_anonymous_aggregates_and_typedefs() {
        let data = sample();
        let btf = RawBtf::parse(&data).unwrap();
        let outer = btf.struct_by_name("outer").unwrap();
        assert_eq!(outer, 6);
        let at = |m| btf.member_bits(outer, m);
        let plain = |bit_offset| {
            Some(MemberBits {
                bit_offset,
                bitfield: false,
            })
        };
        assert_eq!(at("a"), plain(0));
        assert_eq!(at("b"), plain(64));
        assert_eq!(at("c"), plain(64));
        assert_eq!(
            at("d"),
            Some(MemberBits {
                bit_offset: 96,
                bitfield: true
            })
        );
        assert_eq!(at("missing"), None);
        assert_eq!(btf.struct_by_name("inner_t"), None);
        assert_eq!(btf.struct_by_name("absent"), None);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let data = sample();
        for len in 0..data.len() {
            // Cutting into the string section leaves a parseable but shorter file only if the
            // header still fits; any prefix shorter than the sections it declares is an error.
            assert!(
                RawBtf::parse(&data[..len]).is_err(),
                "prefix of {len} bytes"
            );
        }
    }

    #[test]
    fn rejects_wrong_magic_and_unknown_kinds() {
        let mut data = sample();
        data[0] ^= 0xff;
        assert!(matches!(
            RawBtf::parse(&data),
            Err(RawBtfError::BadMagic(_))
        ));
        let mut b = Builder::new();
        b.record("x", 31, 0, false, 0);
        assert_eq!(
            RawBtf::parse(&b.build()).err(),
            Some(RawBtfError::UnknownKind { id: 1, kind: 31 })
        );
    }

    #[test]
    fn anonymous_members_pointing_back_do_not_explode() {
        // Struct 1 has 64 anonymous members of its own type: without a budget, a search for a
        // missing member would visit 64^16 aggregates.
        let mut b = Builder::new();
        let members: Vec<(&str, u32, u32, u32)> = (0..64).map(|_| ("", 1, 0, 0)).collect();
        b.aggregate(KIND_STRUCT, "loop", &members);
        let data = b.build();
        let btf = RawBtf::parse(&data).unwrap();
        assert_eq!(btf.member_bits(1, "nothing"), None);
    }

    #[test]
    fn a_self_referencing_typedef_ends() {
        let mut b = Builder::new();
        b.typedef("loop_t", 1); // 1 → 1 → …
        b.int("int", 4); // 2
        b.aggregate(KIND_STRUCT, "s", &[("", 1, 0, 0), ("x", 2, 32, 0)]); // 3
        let data = b.build();
        let btf = RawBtf::parse(&data).unwrap();
        assert_eq!(btf.member_bits(3, "x").map(|m| m.bit_offset), Some(32));
        assert_eq!(btf.member_bits(3, "nothing"), None);
    }

    #[test]
    fn tracepoint_arguments_and_functions() {
        let mut b = Builder::new();
        b.int("int", 4); // 1
        b.func_proto(2, 1); // 2: (ctx, task)
        b.pointer(2); // 3
        b.typedef("btf_trace_sched_process_exit", 3); // 4
        b.func_proto(3, 1); // 5
        b.func("security_socket_sendmsg", 5); // 6
        b.typedef("btf_trace_not_a_pointer", 1); // 7
        let data = b.build();
        let btf = RawBtf::parse(&data).unwrap();
        assert_eq!(btf.tracepoint_args("sched_process_exit"), Some(1));
        assert_eq!(btf.tracepoint_args("sock_send_length"), None);
        assert_eq!(btf.tracepoint_args("not_a_pointer"), None);
        assert!(btf.has_function("security_socket_sendmsg"));
        assert!(!btf.has_function("sock_sendmsg"));
    }
}
