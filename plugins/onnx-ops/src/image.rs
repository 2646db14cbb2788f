//! ImageDecoder (ai.onnx, opset 20+): decodes the encoded image in a 1-D uint8 tensor (BMP,
//! JPEG, PNG, PNM, TIFF or WebP, recognised by its leading bytes) into a uint8 image of shape
//! [H, W, 3] (`pixel_format` "RGB", the default, or "BGR") or [H, W, 1] ("Grayscale").
//!
//! The ONNX reference decodes with Pillow, so conversions follow Pillow: grayscale from colour
//! is Pillow's `convert("L")` luma, alpha is dropped, 16-bit samples keep their high byte (as
//! Pillow's `RGB;16B` unpacking does). JPEG 2000, which the `image` crate cannot decode, is
//! refused with an error naming it. The stream comes from a request, so everything sized by it
//! is bounded: the decoded image may not exceed [`MAX_DECODED_BYTES`].
//!
//! JPEG is decoded by libjpeg-turbo's decoder (the `mozjpeg` crate, built from source), not by
//! the `image` crate: Pillow decodes with libjpeg-turbo, and JPEG decoders differ by a unit or
//! two in their IDCT, chroma upsampling and YCbCr conversion. With libjpeg's defaults, as
//! Pillow leaves them (accurate integer IDCT, fancy upsampling), the pixels are Pillow's.

use crate::util::required;
use ::image::{
    DynamicImage, GrayImage, ImageDecoder as _, ImageError, ImageFormat, ImageReader, Limits,
    RgbImage,
};
use mozjpeg::{ColorSpace, Decompress};
use opreg_sdk::prelude::*;
use std::cell::Cell;
use std::io::{self, BufRead, Cursor, Read};
use std::panic::{self, AssertUnwindSafe};

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

/// True for a JPEG stream: the SOI marker and the start of the next marker (as the `image`
/// crate recognises JPEG).
fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xff, 0xd8, 0xff])
}

/// A JPEG decoding error.
fn jpeg_error(message: impl std::fmt::Display) -> PluginError {
    PluginError::invalid(format!("{OP}: cannot decode the Jpeg image: {message}"))
}

/// The encoded stream as libjpeg's source reads it, noting whether libjpeg asked for more
/// bytes than there are. libjpeg itself only warns at the end of its input (it ends the stream
/// with a made-up EOI marker and fills the rest of the image with grey), and the `mozjpeg`
/// crate silences warnings; Pillow reports such a stream as truncated, and so does this kernel.
struct JpegSource<'a> {
    rest: &'a [u8],
    ran_out: &'a Cell<bool>,
}

impl Read for JpegSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.rest.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.ran_out.set(true);
        }
        Ok(n)
    }
}

impl BufRead for JpegSource<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.rest.is_empty() {
            self.ran_out.set(true);
        }
        Ok(self.rest)
    }

    fn consume(&mut self, n: usize) {
        self.rest = &self.rest[n.min(self.rest.len())..];
    }
}

/// Decodes a JPEG stream with libjpeg-turbo as Pillow does: grayscale streams to one channel,
/// CMYK and YCCK ones to CMYK and from there to RGB as Pillow converts them, everything else to
/// RGB by libjpeg. libjpeg reports fatal errors by unwinding out of its calls (the `mozjpeg`
/// crate builds it with unwind tables for that); they are caught here and become errors.
fn decode_jpeg(bytes: &[u8]) -> Result<DynamicImage, PluginError> {
    let ran_out = Cell::new(false);
    let source = JpegSource {
        rest: bytes,
        ran_out: &ran_out,
    };
    match panic::catch_unwind(AssertUnwindSafe(|| decode_jpeg_from(source, &ran_out))) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg failed");
            // Past the end libjpeg reads a made-up EOI marker, which can break the segment it
            // was reading: the cause is then the truncation.
            if ran_out.get() {
                Err(jpeg_error(format!("the stream is truncated ({message})")))
            } else {
                Err(jpeg_error(message))
            }
        }
    }
}

/// The error for a stream that ended before the image did.
fn jpeg_truncated() -> PluginError {
    jpeg_error("the stream is truncated")
}

fn decode_jpeg_from(
    source: JpegSource<'_>,
    ran_out: &Cell<bool>,
) -> Result<DynamicImage, PluginError> {
    let dec = Decompress::new_reader(source).map_err(|e| {
        // A stream that ends inside the header reads as one with no image in it.
        if ran_out.get() {
            jpeg_truncated()
        } else {
            jpeg_error(e)
        }
    })?;
    let (w, h) = dec.size();
    let space = dec.color_space();
    let decoded_channels: u64 = match space {
        ColorSpace::JCS_GRAYSCALE => 1,
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => 4,
        _ => 3,
    };
    // Everything is bounded from the header before libjpeg allocates for the image: the output
    // (3 bytes a pixel at most), the decoded pixels, and the whole-image coefficient buffer a
    // progressive stream needs (a 2-byte coefficient per sample of each component, whose
    // blocks are padded to the sampling factors; counted for every stream, as a bound).
    let pixels = w as u64 * h as u64;
    let coefficients: u64 = dec
        .components()
        .iter()
        .map(|c| {
            let blocks_w = u64::from(c.width_in_blocks) + c.h_samp_factor.max(0) as u64;
            let blocks_h = u64::from(c.height_in_blocks) + c.v_samp_factor.max(0) as u64;
            blocks_w * blocks_h * 128
        })
        .sum();
    let decoded_bytes = pixels * decoded_channels;
    if pixels * 3 > MAX_DECODED_BYTES || decoded_bytes + coefficients > MAX_DECODED_BYTES {
        return Err(PluginError::invalid(format!(
            "{OP}: the Jpeg image is {w}x{h} pixels, over the {} MiB decoding limit",
            MAX_DECODED_BYTES >> 20
        )));
    }
    let mut started = match space {
        ColorSpace::JCS_GRAYSCALE => dec.grayscale(),
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => dec.to_colorspace(ColorSpace::JCS_CMYK),
        _ => dec.rgb(),
    }
    .map_err(jpeg_error)?;
    let data = started.read_scanlines::<u8>().map_err(jpeg_error)?;
    if ran_out.get() {
        return Err(jpeg_truncated());
    }
    // Reads on to the EOI marker, as Pillow does: a broken marker there is an error.
    started.finish().map_err(jpeg_error)?;
    let (w, h) = (w as u32, h as u32);
    let img = match space {
        ColorSpace::JCS_GRAYSCALE => GrayImage::from_raw(w, h, data).map(DynamicImage::ImageLuma8),
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
            let rgb = data
                .chunks_exact(4)
                .flat_map(|p| adobe_cmyk_to_rgb([p[0], p[1], p[2], p[3]]))
                .collect();
            RgbImage::from_raw(w, h, rgb).map(DynamicImage::ImageRgb8)
        }
        _ => RgbImage::from_raw(w, h, data).map(DynamicImage::ImageRgb8),
    };
    img.ok_or_else(|| jpeg_error("libjpeg returned fewer pixels than the image has"))
}

/// A CMYK JPEG pixel as Pillow reads and converts it: the samples inverted (Pillow assumes
/// Adobe's convention, `CMYK;I`), then its `cmyk2rgb`, `nk - c * nk / 255` rounded.
fn adobe_cmyk_to_rgb(stored: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = stored.map(|v| 255 - u32::from(v));
    let nk = 255 - k;
    let channel = |v: u32| {
        let t = v * nk + 128;
        (nk - (((t >> 8) + t) >> 8)) as u8
    };
    [channel(c), channel(m), channel(y)]
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
    if is_jpeg(bytes) {
        return decode_jpeg(bytes);
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

    /// `img` encoded by `encoder` into a fresh buffer.
    fn encode<'b, E: ImageEncoder>(
        img: &RgbImage,
        buf: &'b mut Vec<u8>,
        encoder: impl FnOnce(&'b mut Vec<u8>) -> E,
    ) {
        encoder(buf)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                ::image::ExtendedColorType::Rgb8,
            )
            .unwrap();
    }

    fn png(img: &RgbImage) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(img, &mut buf, ::image::codecs::png::PngEncoder::new);
        buf
    }

    fn bmp(img: &RgbImage) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(img, &mut buf, ::image::codecs::bmp::BmpEncoder::new);
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

    /// Encodes `pixels` (`w` x `h`, in `space`) as a JPEG with mozjpeg: progressive (its
    /// default) or baseline (libjpeg-turbo's defaults), quality 90, chroma subsampled 4:2:0.
    fn jpeg(space: ColorSpace, w: usize, h: usize, pixels: &[u8], progressive: bool) -> Vec<u8> {
        let mut c = mozjpeg::Compress::new(space);
        if !progressive {
            c.set_fastest_defaults();
        }
        c.set_size(w, h);
        c.set_quality(90.0);
        let mut started = c.start_compress(Vec::new()).unwrap();
        started.write_scanlines(pixels).unwrap();
        started.finish().unwrap()
    }

    /// A `w` x `h` RGB image with smooth gradients (and, with `noise`, speckles that make the
    /// entropy-coded data long).
    fn gradient(w: u32, h: u32, noise: bool) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let speckle = if noise {
                ((x * 7919 + y * 104729) % 61) as u8
            } else {
                0
            };
            Rgb([
                (x * 255 / w.max(2)) as u8 ^ speckle,
                (y * 255 / h.max(2)) as u8,
                ((x + y) * 4) as u8 ^ speckle,
            ])
        })
    }

    fn assert_near(got: &[u8], want: &[u8], tolerance: u8) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(g.abs_diff(*w) <= tolerance, "sample {i}: {g} vs {w}");
        }
    }

    #[test]
    fn jpeg_decodes_rgb_bgr_and_grayscale() {
        let img = gradient(17, 9, false);
        for progressive in [false, true] {
            let bytes = jpeg(ColorSpace::JCS_RGB, 17, 9, img.as_raw(), progressive);
            let rgb = run(&bytes, None).unwrap();
            assert_eq!(rgb.shape(), &[9, 17, 3]);
            let rgb = rgb.to_vec::<u8>().unwrap();
            assert_near(&rgb, img.as_raw(), 16);

            let bgr = run(&bytes, Some("BGR")).unwrap();
            assert_eq!(bgr.shape(), &[9, 17, 3]);
            let want: Vec<u8> = rgb
                .chunks_exact(3)
                .flat_map(|p| [p[2], p[1], p[0]])
                .collect();
            assert_eq!(bgr.to_vec::<u8>().unwrap(), want);

            // As Pillow: decoded to RGB, then converted to L (not libjpeg's own Y channel).
            let gray = run(&bytes, Some("Grayscale")).unwrap();
            assert_eq!(gray.shape(), &[9, 17, 1]);
            let want: Vec<u8> = rgb
                .chunks_exact(3)
                .map(|p| luma(p[0], p[1], p[2]))
                .collect();
            assert_eq!(gray.to_vec::<u8>().unwrap(), want);
        }
    }

    #[test]
    fn grayscale_jpeg_is_replicated() {
        let pixels: Vec<u8> = (0..8 * 5).map(|i| (i * 6) as u8).collect();
        let bytes = jpeg(ColorSpace::JCS_GRAYSCALE, 8, 5, &pixels, false);
        let gray = run(&bytes, Some("Grayscale")).unwrap();
        assert_eq!(gray.shape(), &[5, 8, 1]);
        let gray = gray.to_vec::<u8>().unwrap();
        assert_near(&gray, &pixels, 8);
        let rgb = run(&bytes, None).unwrap();
        assert_eq!(rgb.shape(), &[5, 8, 3]);
        let want: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v]).collect();
        assert_eq!(rgb.to_vec::<u8>().unwrap(), want);
    }

    #[test]
    fn cmyk_jpeg_converts_as_pillow() {
        assert_eq!(adobe_cmyk_to_rgb([255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(adobe_cmyk_to_rgb([0, 0, 0, 255]), [0, 0, 0]);
        assert_eq!(adobe_cmyk_to_rgb([255, 255, 255, 0]), [0, 0, 0]);
        assert_eq!(adobe_cmyk_to_rgb([0, 255, 255, 255]), [0, 255, 255]);
        assert_eq!(adobe_cmyk_to_rgb([127, 255, 255, 127]), [63, 127, 127]);
        // A flat CMYK image, stored inverted (Adobe's convention): cyan.
        let pixels: Vec<u8> = [0u8, 255, 255, 255].repeat(16 * 8);
        let bytes = jpeg(ColorSpace::JCS_CMYK, 16, 8, &pixels, false);
        let rgb = run(&bytes, None).unwrap();
        assert_eq!(rgb.shape(), &[8, 16, 3]);
        assert_near(
            &rgb.to_vec::<u8>().unwrap(),
            &[0, 255, 255].repeat(16 * 8),
            2,
        );
    }

    #[test]
    fn bad_jpeg_streams_are_errors() {
        let img = gradient(64, 48, true);
        for progressive in [false, true] {
            let bytes = jpeg(ColorSpace::JCS_RGB, 64, 48, img.as_raw(), progressive);
            assert!(run(&bytes, None).is_ok());
            // Cut in the entropy-coded data, in the header, and right after SOI.
            for len in [bytes.len() / 2, bytes.len() - 40, 30, 3] {
                let msg = invalid(run(&bytes[..len], None));
                assert!(
                    msg.contains("Jpeg") && msg.contains("truncated"),
                    "{len}: {msg}"
                );
            }
            // Only the EOI marker missing: libjpeg's Huffman decoder (or, in a progressive
            // stream, its marker reader) reads past the end, and Pillow calls it truncated.
            let msg = invalid(run(&bytes[..bytes.len() - 2], None));
            assert!(msg.contains("truncated"), "{msg}");
        }
        // A JPEG signature followed by junk: libjpeg's fatal error (an unknown marker),
        // caught; and junk with no marker in it, which libjpeg scans to its end.
        let mut junk = vec![0xff, 0xd8, 0xff, 0x12];
        junk.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
        let msg = invalid(run(&junk, None));
        assert!(msg.contains("Jpeg") && msg.contains("0x12"), "{msg}");
        junk[3] = 0;
        let msg = invalid(run(&junk, None));
        assert!(msg.contains("Jpeg") && msg.contains("truncated"), "{msg}");
        let msg = invalid(run(&[0xff, 0xd8, 0xff, 0xd9], None));
        assert!(msg.contains("Jpeg"), "{msg}");
    }

    #[test]
    fn damaged_jpegs_never_panic() {
        let img = gradient(24, 16, true);
        for progressive in [false, true] {
            let bytes = jpeg(ColorSpace::JCS_RGB, 24, 16, img.as_raw(), progressive);
            let check = |b: &[u8]| {
                if let Err(e) = run(b, None) {
                    assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
                }
            };
            for len in 0..bytes.len() {
                check(&bytes[..len]);
            }
            for i in (2..bytes.len()).step_by(3) {
                let mut b = bytes.clone();
                b[i] ^= 0x5a;
                check(&b);
            }
        }
    }

    #[test]
    fn huge_jpeg_is_refused_before_allocation() {
        let img = gradient(16, 16, false);
        let mut bytes = jpeg(ColorSpace::JCS_RGB, 16, 16, img.as_raw(), false);
        // Patch the baseline frame header (SOF0: FF C0, length, precision, height, width).
        let sof = bytes.windows(2).position(|m| m == [0xff, 0xc0]).unwrap();
        bytes[sof + 5..sof + 9].copy_from_slice(&[0xea, 0x60, 0xea, 0x60]);
        let msg = invalid(run(&bytes, None));
        assert!(msg.contains("60000x60000"), "{msg}");
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
