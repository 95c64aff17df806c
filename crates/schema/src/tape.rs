//! [`Tape`]: one decoded event in schema order, in reusable buffers.
//!
//! The validator writes every value of an event into a tape while it checks
//! it; the protector rewrites protected slots in place; the lake appends the
//! finished tape to its Arrow builders. A tape is cleared and reused for the
//! next event, so the steady state allocates nothing per event, and a
//! rejected event leaves no partial rows behind in any column builder.
//!
//! A tape can also hold many events one after another (a request's, say):
//! [`crate::validate_append`] adds one event and returns its root slot, and
//! leaves the tape as it was when the event is refused.
//!
//! Layout: a record with `n` fields owns `n` consecutive slots, in schema
//! field order, whatever order the JSON keys came in. Arrays and maps own a
//! run of consecutive slots (maps alternate key and value). Text and bytes
//! live in one byte buffer that slots point into.

/// One value in a [`Tape`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Slot {
    /// Not filled yet (only seen while decoding).
    Unset,
    /// `null`.
    Null,
    /// A boolean.
    Bool(bool),
    /// int, date (days) and time-millis.
    Int(i32),
    /// long, timestamps (in the type's unit) and time-micros.
    Long(i64),
    /// float.
    Float(f32),
    /// double.
    Double(f64),
    /// UTF-8 text at `bytes[start..start + len]`.
    Str {
        /// Offset into the tape's byte buffer.
        start: u32,
        /// Length in bytes.
        len: u32,
    },
    /// Raw bytes at `bytes[start..start + len]`.
    Bytes {
        /// Offset into the tape's byte buffer.
        start: u32,
        /// Length in bytes.
        len: u32,
    },
    /// A decimal's unscaled value, at `decimals[index]`.
    Decimal(u32),
    /// An enum symbol, by its index in the schema's symbol list.
    Enum(u32),
    /// A record whose field slots start at `slots[start]`.
    Record(u32),
    /// An array of `len` items at `slots[start..]`.
    List {
        /// First item slot.
        start: u32,
        /// Number of items.
        len: u32,
    },
    /// A map of `len` entries at `slots[start..start + 2 * len]`, key then value.
    Map {
        /// First key slot.
        start: u32,
        /// Number of entries.
        len: u32,
    },
}

/// A position in a [`Tape`] (see [`Tape::mark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    slots: usize,
    bytes: usize,
    decimals: usize,
}

/// Decoded events; see the module docs for the layout.
#[derive(Debug, Default, Clone)]
pub struct Tape {
    pub(crate) slots: Vec<Slot>,
    pub(crate) pending: Vec<Slot>,
    pub(crate) bytes: Vec<u8>,
    pub(crate) decimals: Vec<i128>,
    scratch: Vec<u8>,
}

impl Tape {
    /// An empty tape.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget the previous event, keeping the buffers.
    pub fn clear(&mut self) {
        self.slots.clear();
        self.pending.clear();
        self.bytes.clear();
        self.decimals.clear();
    }

    /// The root record's slot of a tape holding one event (valid after a
    /// successful [`crate::validate_json`]).
    #[must_use]
    pub fn root(&self) -> Slot {
        Slot::Record(0)
    }

    /// Make room for about `json_bytes` of JSON's values (text and
    /// slots), so a tape filled with a whole request grows at most once.
    pub fn reserve(&mut self, json_bytes: usize) {
        self.bytes.reserve(json_bytes.saturating_sub(self.bytes.len()));
        // About one value per 16 bytes of JSON.
        let slots = json_bytes / 16;
        self.slots.reserve(slots.saturating_sub(self.slots.len()));
    }

    /// Bytes allocated by the tape's buffers.
    #[must_use]
    pub fn capacity_bytes(&self) -> usize {
        self.bytes.capacity()
            + self.scratch.capacity()
            + (self.slots.capacity() + self.pending.capacity()) * std::mem::size_of::<Slot>()
            + self.decimals.capacity() * std::mem::size_of::<i128>()
    }

    /// The current length, to return to with [`Tape::truncate`].
    #[must_use]
    pub fn mark(&self) -> Mark {
        Mark { slots: self.slots.len(), bytes: self.bytes.len(), decimals: self.decimals.len() }
    }

    /// Forget everything written after `mark`.
    pub fn truncate(&mut self, mark: Mark) {
        self.slots.truncate(mark.slots);
        self.bytes.truncate(mark.bytes);
        self.decimals.truncate(mark.decimals);
        self.pending.clear();
    }

    /// The slot at `index`.
    #[must_use]
    pub fn slot(&self, index: u32) -> Slot {
        self.slots[index as usize]
    }

    /// Mutable access to the slot at `index` (for the protector).
    pub fn slot_mut(&mut self, index: u32) -> &mut Slot {
        &mut self.slots[index as usize]
    }

    /// The text of a [`Slot::Str`] (empty for other slots).
    #[must_use]
    pub fn str(&self, slot: Slot) -> &str {
        match slot {
            Slot::Str { start, len } => {
                let b = &self.bytes[start as usize..(start + len) as usize];
                // Only valid UTF-8 is ever written as Str.
                std::str::from_utf8(b).unwrap_or_default()
            }
            _ => "",
        }
    }

    /// The bytes of a [`Slot::Bytes`] or [`Slot::Str`].
    #[must_use]
    pub fn bytes(&self, slot: Slot) -> &[u8] {
        match slot {
            Slot::Str { start, len } | Slot::Bytes { start, len } => {
                &self.bytes[start as usize..(start + len) as usize]
            }
            _ => &[],
        }
    }

    /// The unscaled value of a [`Slot::Decimal`].
    #[must_use]
    pub fn decimal(&self, slot: Slot) -> Option<i128> {
        match slot {
            Slot::Decimal(i) => self.decimals.get(i as usize).copied(),
            _ => None,
        }
    }

    /// Append text and return its slot.
    pub fn push_str(&mut self, s: &str) -> Slot {
        let (start, len) = self.push_raw(s.as_bytes());
        Slot::Str { start, len }
    }

    /// Replace the text of the [`Slot::Str`] at `index` with what `f`
    /// writes, given the old text's UTF-8 bytes. `f` must write valid
    /// UTF-8 only. Other slots are left alone.
    pub fn rewrite_str(&mut self, index: u32, f: impl FnOnce(&[u8], &mut Vec<u8>)) {
        let Slot::Str { start, len } = self.slots[index as usize] else {
            return;
        };
        self.scratch.clear();
        f(&self.bytes[start as usize..(start + len) as usize], &mut self.scratch);
        debug_assert!(std::str::from_utf8(&self.scratch).is_ok());
        let new_start = self.bytes.len();
        self.bytes.extend_from_slice(&self.scratch);
        self.slots[index as usize] = Slot::Str { start: to_u32(new_start), len: to_u32(self.scratch.len()) };
    }

    /// Append bytes the caller has checked are UTF-8, as text.
    pub(crate) fn push_utf8(&mut self, b: &[u8]) -> Slot {
        debug_assert!(std::str::from_utf8(b).is_ok());
        let (start, len) = self.push_raw(b);
        Slot::Str { start, len }
    }

    pub(crate) fn push_bytes(&mut self, b: &[u8]) -> Slot {
        let (start, len) = self.push_raw(b);
        Slot::Bytes { start, len }
    }

    pub(crate) fn push_decimal(&mut self, v: i128) -> Slot {
        self.decimals.push(v);
        Slot::Decimal(to_u32(self.decimals.len() - 1))
    }

    fn push_raw(&mut self, b: &[u8]) -> (u32, u32) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        (to_u32(start), to_u32(b.len()))
    }

    /// Reserve `n` unset slots for a record and return the first index.
    pub(crate) fn reserve_record(&mut self, n: usize) -> u32 {
        let start = self.slots.len();
        self.slots.resize(start + n, Slot::Unset);
        to_u32(start)
    }

    /// A key that appears twice among the pending map entries from `mark`
    /// on (key, value, key, value, ...), if any.
    pub(crate) fn repeated_key(&self, mark: usize) -> Option<Slot> {
        let text = |slot: &Slot| match *slot {
            Slot::Str { start, len } | Slot::Bytes { start, len } => {
                &self.bytes[start as usize..(start + len) as usize]
            }
            _ => &[][..],
        };
        let keys = self.pending[mark..].iter().step_by(2);
        if self.pending.len() - mark <= 2 * 16 {
            // Small maps, the usual ones: compare pairwise, no allocation.
            for (i, a) in keys.clone().enumerate() {
                if let Some(b) = keys.clone().skip(i + 1).find(|b| text(a) == text(b)) {
                    return Some(*b);
                }
            }
            return None;
        }
        let mut sorted: Vec<(&[u8], Slot)> = keys.map(|k| (text(k), *k)).collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        sorted.windows(2).find(|w| w[0].0 == w[1].0).map(|w| w[1].1)
    }

    /// Move the pending items from `mark` on into a contiguous run.
    pub(crate) fn seal_pending(&mut self, mark: usize) -> (u32, u32) {
        let start = self.slots.len();
        self.slots.extend_from_slice(&self.pending[mark..]);
        let len = self.pending.len() - mark;
        self.pending.truncate(mark);
        (to_u32(start), to_u32(len))
    }
}

/// Events are capped far below 4 GiB, so offsets fit in `u32`.
#[allow(clippy::cast_possible_truncation)]
fn to_u32(n: usize) -> u32 {
    debug_assert!(u32::try_from(n).is_ok());
    n as u32
}
