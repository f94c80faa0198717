//! Typed GPU buffers: a storage buffer of f32, u32 (labels, indices) or f16 (activations of an
//! f16 plan) elements with its logical shape — or a view of a range of one (a parameter inside
//! the flat parameter buffer), bound, read and written as if it were a buffer of its own.

use anyhow::{Context, Result, ensure};
use wgpu::util::DeviceExt;

use super::Gpu;

/// What one element of a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    U32,
    /// IEEE binary16: the activations and GEMM operands of an f16 plan (`enable f16;`).
    F16,
}

impl Dtype {
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 | Dtype::U32 => 4,
            Dtype::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::U32 => "u32",
            Dtype::F16 => "f16",
        }
    }
}

/// Bytes a buffer or binding of `numel` elements takes: at least one element (wgpu binds no empty
/// ranges), rounded up to 4 bytes (storage bindings are sized in whole words).
fn size_of(numel: usize, dtype: Dtype) -> u64 {
    (numel.max(1) * dtype.bytes()).next_multiple_of(4) as u64
}

#[derive(Debug)]
pub struct Tensor {
    pub buffer: wgpu::Buffer,
    pub dtype: Dtype,
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

    /// Bytes the tensor binds: its elements, at least one (wgpu binds no empty ranges), in whole words.
    pub fn bytes(&self) -> u64 {
        size_of(self.numel(), self.dtype)
    }

    /// The binding of this tensor's range (the whole buffer, or the view's part of it).
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: std::num::NonZeroU64::new(self.bytes()),
        })
    }

    /// A zero-filled f32 tensor. An empty shape product still gets one element: wgpu binds no empty buffers.
    pub fn zeros(gpu: &Gpu, label: &str, shape: &[usize]) -> Result<Tensor> {
        Tensor::zeros_of(gpu, label, shape, Dtype::F32)
    }

    /// A zero-filled tensor of `dtype` elements.
    pub fn zeros_of(gpu: &Gpu, label: &str, shape: &[usize], dtype: Dtype) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let size = size_of(numel, dtype);
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
            dtype,
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
            dtype: Dtype::F32,
            offset: 0,
            shape: vec![data.len()],
            label: label.to_string(),
            stats: Some(gpu.stats.clone()),
        })
    }

    /// A zero-filled 1-D buffer of `len` f32 values, bound only through views (see [`Tensor::flat`]).
    pub fn flat_zeros(gpu: &Gpu, label: &str, len: usize) -> Result<Tensor> {
        Tensor::flat_zeros_of(gpu, label, len, Dtype::F32)
    }

    /// A zero-filled 1-D buffer of `len` `dtype` values, bound only through views.
    pub fn flat_zeros_of(gpu: &Gpu, label: &str, len: usize, dtype: Dtype) -> Result<Tensor> {
        let size = size_of(len, dtype);
        let max = gpu.limits.max_buffer_size;
        ensure!(size <= max, "{label}: {len} values need {size} bytes; the adapter's buffers hold at most {max}");
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: usage(),
            mapped_at_creation: false,
        });
        gpu.stats.alloc(size);
        Ok(Tensor {
            buffer,
            dtype,
            offset: 0,
            shape: vec![len],
            label: label.to_string(),
            stats: Some(gpu.stats.clone()),
        })
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
        let offset = self.offset + (start * self.dtype.bytes()) as u64;
        let align = u64::from(gpu.limits.min_storage_buffer_offset_alignment);
        ensure!(
            offset.is_multiple_of(align),
            "{label}: view offset {offset} is not a multiple of the adapter's {align}"
        );
        let max = gpu.limits.max_storage_buffer_binding_size;
        ensure!(
            size_of(numel, self.dtype) <= max,
            "{label}: {shape:?} needs more than the adapter's {max}-byte binding"
        );
        Ok(Tensor {
            buffer: self.buffer.clone(),
            dtype: self.dtype,
            offset,
            shape: shape.to_vec(),
            label: label.to_string(),
            stats: None,
        })
    }

    /// A tensor holding `data` (f32, u32 or f16), which must have the shape's element count.
    pub fn from_slice<T: Element>(gpu: &Gpu, label: &str, shape: &[usize], data: &[T]) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        ensure!(data.len() == numel, "{label}: shape {shape:?} has {numel} elements, data has {}", data.len());
        let mut bytes = bytemuck::cast_slice::<T, u8>(data).to_vec();
        bytes.resize(size_of(numel, T::DTYPE) as usize, 0);
        let buffer = gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: &bytes,
            usage: usage(),
        });
        gpu.stats.alloc(buffer.size());
        Ok(Tensor {
            buffer,
            dtype: T::DTYPE,
            offset: 0,
            shape: shape.to_vec(),
            label: label.to_string(),
            stats: Some(gpu.stats.clone()),
        })
    }

    /// Overwrite the contents from the host (queued; ordered before the next submit). f32 and u32
    /// share a width (index buffers are made as f32 zeros and written as u32), f16 is its own.
    pub fn write<T: Element>(&self, gpu: &Gpu, data: &[T]) -> Result<()> {
        ensure!(data.len() == self.numel(), "write of {} elements into {:?}", data.len(), self.shape);
        self.same_width::<T>("write")?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        ensure!(
            bytes.len().is_multiple_of(4),
            "{}: writes are whole words; {} f16 values are not",
            self.label,
            data.len()
        );
        gpu.queue.write_buffer(&self.buffer, self.offset, bytes);
        Ok(())
    }

    fn same_width<T: Element>(&self, what: &str) -> Result<()> {
        ensure!(
            T::DTYPE.bytes() == self.dtype.bytes(),
            "{what} of {} values from {}, which holds {}",
            T::DTYPE.name(),
            self.label,
            self.dtype.name()
        );
        Ok(())
    }

    /// The values as f32, whatever the tensor holds (f16 widened exactly).
    pub fn read_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        match self.dtype {
            Dtype::F16 => Ok(self.read::<half::f16>(gpu)?.into_iter().map(f32::from).collect()),
            _ => self.read::<f32>(gpu),
        }
    }

    /// Copy back to the host. Waits for the GPU: for tests, metrics and checkpoints only.
    pub fn read<T: Element>(&self, gpu: &Gpu) -> Result<Vec<T>> {
        self.same_width::<T>("read")?;
        if self.numel() == 0 {
            return Ok(Vec::new());
        }
        // Copies are whole words: an odd count of f16 values reads the padding after them too.
        let size = size_of(self.numel(), self.dtype);
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
        let out = bytemuck::cast_slice::<u8, T>(&view)[..self.numel()].to_vec();
        drop(view);
        staging.unmap();
        gpu.return_staging(staging);
        Ok(out)
    }
}

/// A host type a tensor can hold.
pub trait Element: bytemuck::Pod {
    const DTYPE: Dtype;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
}

impl Element for u32 {
    const DTYPE: Dtype = Dtype::U32;
}

impl Element for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
}
