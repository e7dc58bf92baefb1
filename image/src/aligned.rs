//! Buffers whose start is aligned to the page size, as `O_DIRECT` reads
//! and writes want them (the page store's writer and the restore's cold
//! reads).

use std::alloc::Layout;

/// Alignment of an [`Aligned`] buffer's start.
const ALIGN: usize = 4096;

/// A zeroed buffer of a fixed length whose start is page-aligned.
pub struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is owned memory, reached only through `&self` /
// `&mut self`, as a `Vec<u8>`'s is.
unsafe impl Send for Aligned {}
// SAFETY: as above: `&self` gives out only shared bytes.
unsafe impl Sync for Aligned {}

impl Aligned {
    /// `len` zero bytes (at least one), page-aligned.
    pub fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), ALIGN).expect("a valid layout");
        // SAFETY: a non-zero size. Zeroed: a large one comes as fresh
        // zero pages, at no cost before it is written.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Self { ptr, layout }
    }

    /// The whole buffer.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `layout.size()` initialised bytes allocated by `new`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    /// The whole buffer, to write into.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated by `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_page_aligned_zeroed_and_of_its_length() {
        let mut b = Aligned::new(3 * ALIGN + 5);
        assert_eq!(b.bytes().as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.bytes().len(), 3 * ALIGN + 5);
        assert!(b.bytes().iter().all(|&x| x == 0));
        b.bytes_mut()[7] = 9;
        assert_eq!(b.bytes()[7], 9);
    }
}
