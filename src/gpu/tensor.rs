//! Typed GPU buffers: a storage buffer of 4-byte elements (f32, or u32 for labels and indices)
//! with its logical shape — or a view of a range of one (a parameter inside the flat parameter
//! buffer), bound, read and written as if it were a buffer of its own.

use anyhow::{Context, Result, ensure};
use wgpu::util::DeviceExt;

use super::Gpu;

#[derive(Debug)]
pub struct Tensor {
    pub buffer: wgpu::Buffer,
    /// Byte offset of element 0 in `buffer` (0 unless this is a view).
    pub offset: u64,
    pub shape: Vec<usize>,
    /// What it holds ("features.4 output", "layer1.0.conv1.weight value"), as its buffer is
    /// labelled for GPU captures and validation messages (a view: its own name).
    pub label: String,
    /// The allocation's accounting; None for a view (its owner frees the buffer).
    stats: Option<std::sync::Arc<super::GpuStats>>,
}

impl Drop for Tensor {
    fn drop(&mut self) {
        if let Some(stats) = &self.stats {
            stats.free(self.buffer.size());
        }
    }
}

fn usage() -> wgpu::BufferUsages {
    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST
}

impl Tensor {
    /// Elements (not bytes).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes the tensor binds: its elements, at least one (wgpu binds no empty ranges).
    pub fn bytes(&self) -> u64 {
        (self.numel().max(1) * 4) as u64
    }

    /// The binding of this tensor's range (the whole buffer, or the view's part of it).
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: std::num::NonZeroU64::new(self.bytes()),
        })
    }

    /// A zero-filled tensor. An empty shape product still gets one element: wgpu binds no empty buffers.
    pub fn zeros(gpu: &Gpu, label: &str, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let size = (numel.max(1) * 4) as u64;
        let max = gpu.limits.max_buffer_size.min(gpu.limits.max_storage_buffer_binding_size);
        ensure!(size <= max, "{label}: {shape:?} needs {size} bytes; the adapter binds at most {max} bytes per buffer");
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: usage(),
            mapped_at_creation: false,
        });
        gpu.stats.alloc(size);
        Ok(Tensor {
            buffer,
            offset: 0,
            shape: shape.to_vec(),
            label: label.to_string(),
            stats: Some(gpu.stats.clone()),
        })
    }

    /// A 1-D buffer holding `data`, to be bound only through views ([`Tensor::view`]) of at most
    /// the adapter's binding size: it may itself be larger (the flat parameter buffers of the
    /// largest models are), up to the adapter's buffer size.
    pub fn flat(gpu: &Gpu, label: &str, data: &[f32]) -> Result<Tensor> {
        let size = (data.len().max(1) * 4) as u64;
        let max = gpu.limits.max_buffer_size;
        ensure!(
            size <= max,
            "{label}: {} values need {size} bytes; the adapter's buffers hold at most {max}",
            data.len()
        );
        let contents: &[u8] = if data.is_empty() { &[0; 4] } else { bytemuck::cast_slice(data) };
        let buffer = gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: usage(),
        });
        gpu.stats.alloc(size);
        Ok(Tensor {
            buffer,
            offset: 0,
            shape: vec![data.len()],
            label: label.to_string(),
            stats: Some(gpu.stats.clone()),
        })
    }

    /// A zero-filled 1-D buffer of `len` values, bound only through views (see [`Tensor::flat`]).
    pub fn flat_zeros(gpu: &Gpu, label: &str, len: usize) -> Result<Tensor> {
        let size = (len.max(1) * 4) as u64;
        let max = gpu.limits.max_buffer_size;
        ensure!(size <= max, "{label}: {len} values need {size} bytes; the adapter's buffers hold at most {max}");
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: usage(),
            mapped_at_creation: false,
        });
        gpu.stats.alloc(size);
        Ok(Tensor { buffer, offset: 0, shape: vec![len], label: label.to_string(), stats: Some(gpu.stats.clone()) })
    }

    /// A view of `shape` starting `start` elements into this tensor, which must be aligned to
    /// the adapter's storage-binding offset alignment and fit the adapter's binding size.
    pub fn view(&self, gpu: &Gpu, label: &str, start: usize, shape: &[usize]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        ensure!(
            start + numel <= self.numel(),
            "{label}: a view of {numel} values at {start} does not fit in {} values",
            self.numel()
        );
        let offset = self.offset + (start * 4) as u64;
        let align = u64::from(gpu.limits.min_storage_buffer_offset_alignment);
        ensure!(
            offset.is_multiple_of(align),
            "{label}: view offset {offset} is not a multiple of the adapter's {align}"
        );
        let max = gpu.limits.max_storage_buffer_binding_size;
        ensure!((numel * 4) as u64 <= max, "{label}: {shape:?} needs more than the adapter's {max}-byte binding");
        Ok(Tensor { buffer: self.buffer.clone(), offset, shape: shape.to_vec(), label: label.to_string(), stats: None })
    }

    /// A tensor holding `data` (f32 or u32), which must have the shape's element count.
    pub fn from_slice<T: bytemuck::Pod>(gpu: &Gpu, label: &str, shape: &[usize], data: &[T]) -> Result<Tensor> {
        ensure!(std::mem::size_of::<T>() == 4, "{label}: tensors hold 4-byte elements");
        let numel: usize = shape.iter().product();
        ensure!(data.len() == numel, "{label}: shape {shape:?} has {numel} elements, data has {}", data.len());
        let mut bytes = bytemuck::cast_slice::<T, u8>(data).to_vec();
        if bytes.is_empty() {
            bytes.resize(4, 0);
        }
        let buffer = gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &bytes,
            usage: usage(),
        });
        gpu.stats.alloc(buffer.size());
        Ok(Tensor {
            buffer,
            offset: 0,
            shape: shape.to_vec(),
            label: label.to_string(),
            stats: Some(gpu.stats.clone()),
        })
    }

    /// Overwrite the contents from the host (queued; ordered before the next submit).
    pub fn write<T: bytemuck::Pod>(&self, gpu: &Gpu, data: &[T]) -> Result<()> {
        ensure!(data.len() == self.numel(), "write of {} elements into {:?}", data.len(), self.shape);
        gpu.queue.write_buffer(&self.buffer, self.offset, bytemuck::cast_slice(data));
        Ok(())
    }

    /// Copy back to the host. Waits for the GPU: for tests, metrics and checkpoints only.
    pub fn read<T: bytemuck::Pod>(&self, gpu: &Gpu) -> Result<Vec<T>> {
        let size = (self.numel() * 4) as u64;
        if size == 0 {
            return Ok(Vec::new());
        }
        let staging = gpu.take_staging(size);
        let mut encoder =
            gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("read-back") });
        encoder.copy_buffer_to_buffer(&self.buffer, self.offset, &staging, 0, size);
        gpu.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        gpu.wait()?;
        rx.recv().context("the GPU dropped a read-back")?.context("mapping a read-back buffer")?;
        let view = staging.get_mapped_range(..).context("reading a mapped buffer")?;
        let out = bytemuck::cast_slice::<u8, T>(&view).to_vec();
        drop(view);
        staging.unmap();
        gpu.return_staging(staging);
        Ok(out)
    }
}
