//! ImageDecoder (ai.onnx, opset 20+): decodes the encoded image in a 1-D uint8 tensor (BMP,
//! JPEG, PNG, PNM, TIFF or WebP, recognised by its leading bytes) into a uint8 image of shape
//! [H, W, 3] (`pixel_format` "RGB", the default, or "BGR") or [H, W, 1] ("Grayscale").
//!
//! The ONNX reference decodes with Pillow, so conversions follow Pillow: grayscale from colour
//! is Pillow's `convert("L")` luma, alpha is dropped, 16-bit samples keep their high byte (as
//! Pillow's `RGB;16B` unpacking does). JPEG 2000, which the `image` crate cannot decode, is
//! refused with an error naming it. The stream comes from a request, so everything sized by it
//! is bounded: the decoded image may not exceed [`MAX_DECODED_BYTES`].

use crate::util::required;
use ::image::{DynamicImage, ImageDecoder as _, ImageError, ImageFormat, ImageReader, Limits};
use opreg_sdk::prelude::*;
use std::io::Cursor;

const OP: &str = "ImageDecoder";

/// The formats compiled in, for error messages.
const SUPPORTED: &str = "BMP, JPEG, PNG, PNM, TIFF, WebP";

/// The most bytes a decoded image (as the decoder produces it, and as the output) may take:
/// far beyond any real photograph, well below what would endanger the daemon.
const MAX_DECODED_BYTES: u64 = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PixelFormat {
    Rgb,
    Bgr,
    Grayscale,
}

impl PixelFormat {
    fn channels(self) -> usize {
        match self {
            PixelFormat::Rgb | PixelFormat::Bgr => 3,
            PixelFormat::Grayscale => 1,
        }
    }
}

#[derive(Clone, Debug)]
struct ImageDecoderKernel {
    format: PixelFormat,
}

fn factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let format = match node.string_or("pixel_format", "RGB")?.as_str() {
        "RGB" => PixelFormat::Rgb,
        "BGR" => PixelFormat::Bgr,
        "Grayscale" => PixelFormat::Grayscale,
        other => {
            return Err(PluginError::invalid(format!(
                "{OP}: pixel_format must be \"RGB\", \"BGR\" or \"Grayscale\", got {other:?}"
            )))
        }
    };
    Ok(Box::new(ImageDecoderKernel { format }))
}

/// True for a JPEG 2000 stream: the JP2 file signature box, or a bare J2K codestream (SOC
/// marker followed by SIZ). Recognised so the error names the format rather than calling the
/// stream garbage.
fn is_jpeg2000(bytes: &[u8]) -> bool {
    const JP2: [u8; 12] = [
        0, 0, 0, 0x0c, b'j', b'P', b' ', b' ', 0x0d, 0x0a, 0x87, 0x0a,
    ];
    bytes.starts_with(&JP2) || bytes.starts_with(&[0xff, 0x4f, 0xff, 0x51])
}

/// An `image` error as a plugin error naming the format.
fn image_error(format: ImageFormat, e: ImageError) -> PluginError {
    let message = format!("{OP}: cannot decode the {format:?} image: {e}");
    match e {
        // A format `image` recognises but this build does not decode (GIF, ...).
        ImageError::Unsupported(_) => PluginError::unimplemented(message),
        _ => PluginError::invalid(message),
    }
}

/// Decodes `bytes`, refusing images larger than [`MAX_DECODED_BYTES`] before any pixel
/// buffer is allocated.
fn decode(bytes: &[u8]) -> Result<DynamicImage, PluginError> {
    if bytes.is_empty() {
        return Err(PluginError::invalid(format!(
            "{OP}: encoded_stream is empty"
        )));
    }
    if is_jpeg2000(bytes) {
        return Err(PluginError::unimplemented(format!(
            "{OP}: JPEG 2000 images are not supported (supported formats: {SUPPORTED})"
        )));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PluginError::invalid(format!("{OP}: cannot read encoded_stream: {e}")))?;
    let format = reader.format().ok_or_else(|| {
        PluginError::invalid(format!(
            "{OP}: encoded_stream is not an image in a recognised format (supported: {SUPPORTED})"
        ))
    })?;
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder().map_err(|e| image_error(format, e))?;
    let (w, h) = decoder.dimensions();
    // The output is 3 bytes a pixel at most; the decoder's own buffer may be wider (16-bit,
    // alpha): both must fit.
    let output_bytes = u64::from(w) * u64::from(h) * 3;
    let decoded_bytes = decoder.total_bytes();
    if output_bytes > MAX_DECODED_BYTES || decoded_bytes > MAX_DECODED_BYTES {
        return Err(PluginError::invalid(format!(
            "{OP}: the {format:?} image is {w}x{h} pixels, over the {} MiB decoding limit",
            MAX_DECODED_BYTES >> 20
        )));
    }
    // As `ImageReader::decode` does: the pixel buffer counts against the limit, the decoder's
    // working memory gets what is left.
    limits
        .reserve(decoded_bytes)
        .and_then(|()| decoder.set_limits(limits))
        .map_err(|e| image_error(format, e))?;
    DynamicImage::from_decoder(decoder).map_err(|e| image_error(format, e))
}

/// Pillow's `convert("L")` from RGB: ITU-R 601-2 luma in 16-bit fixed point, rounded.
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

/// Writes the pixels of `src` (`ch` samples each: 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA),
/// narrowed to 8 bits by `to_u8`, into `out` in `format`.
fn emit<S: Copy>(
    src: &[S],
    ch: usize,
    to_u8: impl Fn(S) -> u8,
    format: PixelFormat,
    out: &mut [u8],
) {
    let pixels = src
        .chunks_exact(ch)
        .zip(out.chunks_exact_mut(format.channels()));
    if ch <= 2 {
        // Gray source: replicated for colour output, as Pillow's `convert("RGB")` does.
        for (p, o) in pixels {
            o.fill(to_u8(p[0]));
        }
        return;
    }
    match format {
        PixelFormat::Rgb => pixels.for_each(|(p, o)| {
            o.copy_from_slice(&[to_u8(p[0]), to_u8(p[1]), to_u8(p[2])]);
        }),
        PixelFormat::Bgr => pixels.for_each(|(p, o)| {
            o.copy_from_slice(&[to_u8(p[2]), to_u8(p[1]), to_u8(p[0])]);
        }),
        PixelFormat::Grayscale => pixels.for_each(|(p, o)| {
            o[0] = luma(to_u8(p[0]), to_u8(p[1]), to_u8(p[2]));
        }),
    }
}

impl Kernel for ImageDecoderKernel {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [x] = required(OP, inputs, ["encoded_stream"])?;
        if x.rank() != 1 {
            return Err(PluginError::invalid(format!(
                "{OP}: encoded_stream must be 1-D, got shape {:?}",
                x.shape()
            )));
        }
        let img = decode(x.as_slice::<u8>()?)?;
        let shape = [
            img.height() as usize,
            img.width() as usize,
            self.format.channels(),
        ];
        let out = ctx.output_slice::<u8>(0, &shape)?;
        let id = |v: u8| v;
        // 16-bit samples keep their high byte, as Pillow loads 16-bit PNG and TIFF as RGB.
        let high = |v: u16| (v >> 8) as u8;
        match &img {
            DynamicImage::ImageLuma8(b) => emit(b.as_raw(), 1, id, self.format, out),
            DynamicImage::ImageLumaA8(b) => emit(b.as_raw(), 2, id, self.format, out),
            DynamicImage::ImageRgb8(b) => emit(b.as_raw(), 3, id, self.format, out),
            DynamicImage::ImageRgba8(b) => emit(b.as_raw(), 4, id, self.format, out),
            DynamicImage::ImageLuma16(b) => emit(b.as_raw(), 1, high, self.format, out),
            DynamicImage::ImageLumaA16(b) => emit(b.as_raw(), 2, high, self.format, out),
            DynamicImage::ImageRgb16(b) => emit(b.as_raw(), 3, high, self.format, out),
            DynamicImage::ImageRgba16(b) => emit(b.as_raw(), 4, high, self.format, out),
            // Float samples (and any layout a later `image` adds): its own conversion, which
            // clamps and rounds; the copy is no larger than the decoded image, already bounded.
            other => emit(other.to_rgba8().as_raw(), 4, id, self.format, out),
        }
        Ok(())
    }
}

pub fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx(OP, 20, OPEN_END)
            .constraint("T1", &[DType::U8])
            .constraint("T2", &[DType::U8])
            .inputs(&["T1"])
            .outputs(&["T2"]),
        factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::image::{ImageEncoder, Rgb, RgbImage};
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    /// A 3x2 image with distinct colours.
    fn sample() -> RgbImage {
        RgbImage::from_fn(3, 2, |x, y| {
            Rgb([
                (x * 80 + 10) as u8,
                (y * 100 + 20) as u8,
                (x * 30 + y * 40 + 5) as u8,
            ])
        })
    }

    fn png(img: &RgbImage) -> Vec<u8> {
        let mut buf = Vec::new();
        ::image::codecs::png::PngEncoder::new(&mut buf)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                ::image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        buf
    }

    fn bmp(img: &RgbImage) -> Vec<u8> {
        let mut buf = Vec::new();
        ::image::codecs::bmp::BmpEncoder::new(&mut buf)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                ::image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        buf
    }

    fn run(bytes: &[u8], pixel_format: Option<&str>) -> Result<HostTensor, PluginError> {
        let mut spec = NodeSpec::onnx(OP, 20);
        if let Some(f) = pixel_format {
            spec = spec.attr("pixel_format", AttrValue::String(f.into()));
        }
        let x = HostTensor::from_vec(&[bytes.len()], bytes).unwrap();
        run_kernel(factory, &spec, &[&x], None).map(|mut v| v.remove(0))
    }

    #[test]
    fn decodes_rgb_bgr_and_grayscale() {
        let img = sample();
        for bytes in [png(&img), bmp(&img)] {
            let rgb = run(&bytes, None).unwrap();
            assert_eq!(rgb.shape(), &[2, 3, 3]);
            assert_eq!(rgb.to_vec::<u8>().unwrap(), img.as_raw().clone());

            let bgr = run(&bytes, Some("BGR")).unwrap();
            assert_eq!(bgr.shape(), &[2, 3, 3]);
            let want: Vec<u8> = img.pixels().flat_map(|p| [p[2], p[1], p[0]]).collect();
            assert_eq!(bgr.to_vec::<u8>().unwrap(), want);

            let gray = run(&bytes, Some("Grayscale")).unwrap();
            assert_eq!(gray.shape(), &[2, 3, 1]);
            // Pillow's L = R*299/1000 + G*587/1000 + B*114/1000, rounded to nearest.
            let want: Vec<u8> = img
                .pixels()
                .map(|p| {
                    let l =
                        f64::from(p[0]) * 0.299 + f64::from(p[1]) * 0.587 + f64::from(p[2]) * 0.114;
                    l.round() as u8
                })
                .collect();
            assert_eq!(gray.to_vec::<u8>().unwrap(), want);
        }
    }

    #[test]
    fn gray_source_is_replicated() {
        let img = ::image::GrayImage::from_raw(2, 1, vec![7, 200]).unwrap();
        let mut buf = Vec::new();
        ::image::codecs::png::PngEncoder::new(&mut buf)
            .write_image(img.as_raw(), 2, 1, ::image::ExtendedColorType::L8)
            .unwrap();
        let rgb = run(&buf, None).unwrap();
        assert_eq!(rgb.to_vec::<u8>().unwrap(), vec![7, 7, 7, 200, 200, 200]);
        let gray = run(&buf, Some("Grayscale")).unwrap();
        assert_eq!(gray.to_vec::<u8>().unwrap(), vec![7, 200]);
    }

    #[test]
    fn luma_matches_pillow() {
        // Pillow's rgb2l on a few corners and mid values.
        assert_eq!(luma(0, 0, 0), 0);
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
    }

    fn invalid(r: Result<HostTensor, PluginError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
        e.message.to_string()
    }

    #[test]
    fn bad_streams_are_errors() {
        assert!(invalid(run(&[], None)).contains("empty"));
        assert!(invalid(run(b"definitely not an image", None)).contains("recognised format"));
        // Truncated PNG: the signature and part of the header only.
        let bytes = png(&sample());
        assert!(invalid(run(&bytes[..20], None)).contains("Png"));
        // A truncated pixel stream.
        assert!(invalid(run(&bytes[..bytes.len() - 20], None)).contains("Png"));
        let b = bmp(&sample());
        assert!(invalid(run(&b[..b.len() - 4], None)).contains("Bmp"));
    }

    #[test]
    fn huge_dimensions_are_refused_before_allocation() {
        // A PNM header claiming 60000x60000 RGB pixels (10 GiB) with no data behind it.
        let msg = invalid(run(b"P6\n60000 60000\n255\n", None));
        assert!(msg.contains("60000x60000"), "{msg}");
    }

    #[test]
    fn jpeg2000_is_named() {
        let jp2 = [
            0, 0, 0, 0x0c, b'j', b'P', b' ', b' ', 0x0d, 0x0a, 0x87, 0x0a, 0, 0,
        ];
        let e = run(&jp2, None).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unimplemented);
        assert!(e.message.contains("JPEG 2000"), "{}", e.message);
    }

    #[test]
    fn bad_attribute_and_rank() {
        let bytes = png(&sample());
        assert!(invalid(run(&bytes, Some("HSV"))).contains("pixel_format"));
        let x = HostTensor::from_vec(&[1, bytes.len()], &bytes).unwrap();
        let e = run_kernel(factory, &NodeSpec::onnx(OP, 20), &[&x], None).unwrap_err();
        assert!(e.message.contains("1-D"), "{}", e.message);
    }
}
