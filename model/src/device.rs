//! Device set-up that candle leaves at the driver's defaults.

use candle_core::Device;

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
