//! Device set-up that candle leaves at the driver's defaults.
//!
//! Synchronisation on CUDA: every CUDA operation of a model (weights drawn or loaded, the vision
//! tower, the decoder, the logit lens, sampling reads) goes into the ONE explicit stream that
//! [`open_cuda`] creates, whichever host thread queues it, so the stream's order is the order in
//! which the host queued the work: a thread that hands a tensor to another thread has queued its
//! producers first. The host waits only where it reads a result (candle's copies to the host
//! synchronise that stream) and at the end of loading.

use candle_core::Device;

/// Opens CUDA device `ordinal` for a model: one explicit stream for all of its work (see the
/// module docs), and cudarc's per-allocation event tracking turned off.
///
/// Why not `Device::new_cuda`: it uses the `CU_STREAM_PER_THREAD` handle, which is a different
/// stream on each host thread, so work queued by the thread that loads the weights, the engine
/// thread and any other is not ordered, and a host read synchronises only its own thread's
/// stream (CANDLE.md). Why no event tracking: it orders one slice's uses across *several*
/// streams; with a single stream the stream order already does, while tracking still creates two
/// CUDA events for every allocation (every op's output) and destroys them on free. Set
/// `TGA_CUDA_EVENT_TRACKING=1` to keep cudarc's default (for a side-by-side measurement).
#[cfg(feature = "cuda")]
pub fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda_with_stream(ordinal)?;
    if std::env::var("TGA_CUDA_EVENT_TRACKING").as_deref() != Ok("1") {
        if let Device::Cuda(dev) = &device {
            // SAFETY: no tensor exists on this device yet, and all later work shares its one
            // stream, so every read, write and free of a slice is ordered by that stream; the
            // host reads results only through candle's synchronising copies.
            unsafe { dev.disable_event_tracking() };
        }
    }
    Ok(device)
}

/// Whether `device` is a CUDA device whose allocations carry cudarc's events (see
/// [`open_cuda`]); false off CUDA.
pub fn event_tracking(device: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return dev.is_event_tracking();
    }
    let _ = device;
    false
}

/// Makes the CUDA device's stream-ordered memory pool keep what is freed (release threshold:
/// unlimited). candle allocates every op's output with `cuMemAllocAsync`; at the driver's default
/// threshold of 0 the pool hands its memory back to the OS at every synchronisation (each decode
/// step reads its logits), so the next step maps fresh pages for each activation, a cost that
/// grows with the bytes a step allocates (the attention gathers, a prefill's score chunks).
/// PyTorch's caching allocator keeps freed blocks for the same reason. Returns whether it applied
/// (false off CUDA).
pub fn retain_freed_memory(device: &Device) -> candle_core::Result<bool> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let fail = |what: &str, e: result::DriverError| {
            candle_core::Error::Msg(format!("CUDA memory pool: {what}: {e:?}"))
        };
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()
            .map_err(|e| fail("binding the context", e))?;
        let mut threshold: u64 = u64::MAX;
        // SAFETY: the device comes from a live context; the attribute takes a u64.
        unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device())
                .map_err(|e| fail("default pool", e))?;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .map_err(|e| fail("release threshold", e))?;
        }
        return Ok(true);
    }
    let _ = device;
    Ok(false)
}
