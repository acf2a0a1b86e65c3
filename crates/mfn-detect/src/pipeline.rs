//! Photo to faces, embeddings and decisions: a detector, the alignment and a recognition
//! model together, as insightface's `FaceAnalysis`.
//!
//! [`FaceAligner`] finds, picks and aligns faces (no recognition model: what `mfn-cli
//! align` needs). [`Pipeline`] adds the model and its verification threshold, and answers
//! "same person?" with a [`Decision`] that says where its threshold came from.

use std::ops::Deref;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use image::RgbImage;
use mfn_data::align::{align, template, Aligned, Landmarks, Template};
use mfn_hub::{find_threshold, Hub, Kind, ThresholdOrigin};
use mfn_model::{Checkpoint, MobileFaceNet};

use crate::scrfd::{InputSize, Scrfd};
use crate::{Detector, Error, Face, Mtcnn, Pick, Result, RetinaFace};

/// The detector networks this crate runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DetectorKind {
    /// SCRFD-500M with keypoints (insightface's `det_500m`), from ONNX: the default, as in
    /// insightface's `buffalo_s`.
    #[default]
    Scrfd,
    /// MTCNN with facenet-pytorch's weights (a folder with `pnet.pt`, `rnet.pt`, `onet.pt`).
    Mtcnn,
    /// RetinaFace-MobileNet-0.25 (`mobilenet0.25_Final.pth`).
    RetinaFace,
}

impl DetectorKind {
    /// The network's name, as the command line and the registry spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scrfd => "scrfd",
            Self::Mtcnn => "mtcnn",
            Self::RetinaFace => "retinaface",
        }
    }

    /// Parses [`DetectorKind::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "scrfd" => Some(Self::Scrfd),
            "mtcnn" => Some(Self::Mtcnn),
            "retinaface" => Some(Self::RetinaFace),
            _ => None,
        }
    }

    /// The network a weights file or folder holds, by its form: a folder is MTCNN's
    /// three nets, an `.onnx` file SCRFD, a `.pth`/`.pt` file RetinaFace.
    pub fn of_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(Self::Mtcnn);
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("onnx") => Ok(Self::Scrfd),
            Some("pth" | "pt") => Ok(Self::RetinaFace),
            _ => Err(Error::Detector {
                path: path.to_path_buf(),
                message: "cannot tell the detector from the path: expected an `.onnx` file \
                          (SCRFD), a `.pth` file (RetinaFace) or a folder (MTCNN)"
                    .into(),
            }),
        }
    }

    /// Loads the network's weights from `path` (a file, or MTCNN's folder).
    pub fn load(self, path: &Path, device: &Device) -> Result<Box<dyn Detector>> {
        Ok(match self {
            Self::Scrfd => Box::new(Scrfd::load(path, device)?),
            Self::Mtcnn => Box::new(Mtcnn::load(path, device)?),
            Self::RetinaFace => Box::new(RetinaFace::load(path, device)?),
        })
    }

    /// The network's pinned weights (a file, or MTCNN's folder), found through `hub`:
    /// assets folder, cache, or a checked download. SCRFD's are those of the default pack.
    pub fn pinned_path(self, hub: &Hub) -> Result<PathBuf> {
        Ok(match self {
            Self::Scrfd => {
                let pack = hub.registry.pack(mfn_hub::DEFAULT_PACK)?;
                hub.first_at_hand(&pack.detector)?.path
            }
            Self::Mtcnn => {
                let mut dirs: Vec<PathBuf> = Vec::new();
                for net in ["mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet"] {
                    let p = hub.file(net)?.path;
                    let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
                    if !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
                if dirs.len() != 1 {
                    return Err(Error::Setting(format!(
                        "MTCNN's three nets were found in different folders: {dirs:?}"
                    )));
                }
                dirs.remove(0)
            }
            Self::RetinaFace => hub.file("retinaface_mnet025")?.path,
        })
    }
}

impl std::fmt::Display for DetectorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A face found in a photo and its aligned crop.
#[derive(Clone, Debug)]
pub struct AlignedFace {
    /// What the detector found, in the photo's pixels.
    pub face: Face,
    /// The crop aligned to the template, with its transform and landmark residual.
    pub aligned: Aligned,
    /// The rule that picked it.
    pub picked_by: Pick,
}

/// Finds, picks and aligns the faces in photos.
pub struct FaceAligner {
    detector: Box<dyn Detector>,
    template: Landmarks,
    size: [u32; 2],
    pick: Pick,
}

impl FaceAligner {
    /// Faces from `detector`, aligned onto the template for crops of `size` (width,
    /// height): ArcFace's 5 points (scaled as insightface scales them), or SphereFace's for
    /// 96x112. `pick` chooses which faces of a photo are kept.
    pub fn new(detector: Box<dyn Detector>, size: [u32; 2], pick: Pick) -> Result<Self> {
        let kind = if size == [96, 112] {
            Template::Sphereface
        } else {
            Template::Arcface
        };
        let template = template(kind, [size[0] as usize, size[1] as usize])?;
        Ok(Self {
            detector,
            template,
            size,
            pick,
        })
    }

    /// The detector.
    pub fn detector(&self) -> &dyn Detector {
        self.detector.as_ref()
    }

    /// The rule that picks faces.
    pub fn pick(&self) -> Pick {
        self.pick
    }

    /// Changes the rule that picks faces.
    pub fn set_pick(&mut self, pick: Pick) {
        self.pick = pick;
    }

    /// The crop size, width x height.
    pub fn size(&self) -> [u32; 2] {
        self.size
    }

    /// The picked faces of a decoded photo, aligned; empty when there is none. `path`
    /// names the photo in errors.
    pub fn faces(&self, image: &RgbImage, path: &Path) -> Result<Vec<AlignedFace>> {
        let found = self.detector.detect(image).map_err(|e| match e {
            Error::Detector { message, .. } => Error::Detector {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        let (w, h) = image.dimensions();
        self.pick
            .apply(&found, w, h)
            .into_iter()
            .map(|face| {
                Ok(AlignedFace {
                    aligned: align(image, &face.landmarks, &self.template, self.size)?,
                    face,
                    picked_by: self.pick,
                })
            })
            .collect()
    }

    /// The picked faces of a photo file, aligned; empty when there is none.
    pub fn faces_in_file(&self, path: &Path) -> Result<Vec<AlignedFace>> {
        self.faces(&mfn_data::decode_rgb(path)?, path)
    }
}

/// A face found in a photo, aligned and embedded. It dereferences to its [`Face`], so
/// `face.bbox`, `face.score` and `face.landmarks` read directly.
#[derive(Clone, Debug)]
pub struct EmbeddedFace {
    /// What the detector found, in the photo's pixels.
    pub face: Face,
    /// The crop the model saw, with its transform and landmark residual.
    pub aligned: Aligned,
    /// The unit-length embedding.
    pub embedding: Vec<f32>,
    /// The rule that picked the face.
    pub picked_by: Pick,
}

impl Deref for EmbeddedFace {
    type Target = Face;

    fn deref(&self) -> &Face {
        &self.face
    }
}

/// A verification threshold and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Threshold {
    /// Two faces are the same person when their cosine is at least this.
    pub cosine: f64,
    /// Where it came from: `registry entry `w600k_mbf``, `the metadata of PATH`, `given
    /// by the caller`.
    pub source: String,
    /// How it was measured, with the command that reproduces it.
    pub derivation: String,
}

/// Whether two faces show the same person.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Cosine similarity of the two embeddings, in `-1..=1`.
    pub cosine: f64,
    /// The threshold it was compared with.
    pub threshold: f64,
    /// `cosine >= threshold`.
    pub same: bool,
    /// Where the threshold came from (see [`Threshold::source`]).
    pub threshold_source: String,
    /// How the threshold was measured.
    pub threshold_derivation: String,
}

/// A detector, the alignment and a recognition model: photos in, faces, embeddings and
/// decisions out.
///
/// ```no_run
/// # fn main() -> mfn_detect::Result<()> {
/// let pipeline = mfn_detect::Pipeline::from_registry("buffalo_s")?;
/// let decision = pipeline.verify("a.jpg", "b.jpg")?;
/// println!("same: {} (cosine {:.3})", decision.same, decision.cosine);
/// # Ok(())
/// # }
/// ```
pub struct Pipeline {
    aligner: Option<FaceAligner>,
    model: MobileFaceNet,
    model_source: PathBuf,
    threshold: Option<Threshold>,
    flip: bool,
}

impl Pipeline {
    /// A pack of the registry (`buffalo_s`: SCRFD-500M + `w600k_mbf`), its files found
    /// through the environment's [`Hub`] (assets folder, cache, or checked downloads).
    pub fn from_registry(pack: &str) -> Result<Self> {
        Self::builder().pack(pack).build()
    }

    /// A detector's weights (`.onnx`: SCRFD, `.pth`: RetinaFace, a folder: MTCNN) and a
    /// recognition model file (native `.safetensors`, ONNX, MXNet symbol, PyTorch).
    pub fn from_paths(detector: impl AsRef<Path>, model: impl AsRef<Path>) -> Result<Self> {
        Self::builder()
            .detector_weights(detector.as_ref())
            .model(model.as_ref())
            .build()
    }

    /// A builder, for the choices [`Pipeline::from_registry`] makes for you.
    pub fn builder() -> PipelineBuilder {
        PipelineBuilder::default()
    }

    /// The detector and alignment; [`Error::Setting`] for a pipeline built
    /// [`PipelineBuilder::without_detector`].
    pub fn aligner(&self) -> Result<&FaceAligner> {
        self.aligner.as_ref().ok_or_else(|| {
            Error::Setting(
                "this pipeline was built without a detector: it embeds aligned crops only".into(),
            )
        })
    }

    /// The recognition model.
    pub fn model(&self) -> &MobileFaceNet {
        &self.model
    }

    /// The file the recognition model was loaded from.
    pub fn model_source(&self) -> &Path {
        &self.model_source
    }

    /// The verification threshold, when the model or the caller gives one.
    pub fn threshold(&self) -> Option<&Threshold> {
        self.threshold.as_ref()
    }

    /// The faces of a photo file that the pipeline's [`Pick`] keeps, aligned and
    /// embedded; empty when there is none.
    pub fn faces(&self, photo: impl AsRef<Path>) -> Result<Vec<EmbeddedFace>> {
        let path = photo.as_ref();
        self.faces_in_image(&mfn_data::decode_rgb(path)?, path)
    }

    /// [`Pipeline::faces`] of a decoded photo; `path` names it in errors.
    pub fn faces_in_image(&self, image: &RgbImage, path: &Path) -> Result<Vec<EmbeddedFace>> {
        let faces = self.aligner()?.faces(image, path)?;
        if faces.is_empty() {
            return Ok(Vec::new());
        }
        let crops: Vec<&RgbImage> = faces.iter().map(|f| &f.aligned.image).collect();
        let embeddings = self.embed_crops(&crops, path)?;
        Ok(faces
            .into_iter()
            .zip(embeddings)
            .map(|(f, embedding)| EmbeddedFace {
                face: f.face,
                aligned: f.aligned,
                embedding,
                picked_by: f.picked_by,
            })
            .collect())
    }

    /// Unit-length embeddings of crops already aligned at the model's input size; `path`
    /// names their source in errors.
    pub fn embed_crops(&self, crops: &[&RgbImage], path: &Path) -> Result<Vec<Vec<f32>>> {
        let x = mfn_data::images_to_tensor(crops, &Device::Cpu)?.to_device(self.model.device())?;
        let rows: Vec<Vec<f32>> = self
            .model
            .embed(&x, self.flip)?
            .to_dtype(DType::F32)?
            .to_vec2()?;
        for e in &rows {
            if let Some(i) = e.iter().position(|v| !v.is_finite()) {
                return Err(Error::Setting(format!(
                    "{}: the embedding is not finite (value {i} is {}) under model {}: the \
                     model's weights overflow on this input",
                    path.display(),
                    e[i],
                    self.model_source.display()
                )));
            }
        }
        Ok(rows)
    }

    /// The one face of a photo that the decision is about: the face the pipeline's
    /// [`Pick`] ranks first ([`Pick::Central`] unless set otherwise), or
    /// [`Error::NoFace`].
    pub fn face(&self, photo: impl AsRef<Path>) -> Result<EmbeddedFace> {
        let path = photo.as_ref();
        self.faces(path)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::NoFace {
                path: path.to_path_buf(),
            })
    }

    /// Do the photos `a` and `b` show the same person? Compares the face each photo is
    /// about (see [`Pipeline::face`]) against the verification threshold.
    pub fn verify(&self, a: impl AsRef<Path>, b: impl AsRef<Path>) -> Result<Decision> {
        let (a, b) = (self.face(a)?, self.face(b)?);
        self.decide(&a.embedding, &b.embedding)
    }

    /// Compares two unit-length embeddings against the verification threshold.
    pub fn decide(&self, a: &[f32], b: &[f32]) -> Result<Decision> {
        let t = self.threshold.as_ref().ok_or_else(|| Error::NoThreshold {
            path: self.model_source.clone(),
            message: "neither its metadata nor the registry (by the sha256 of its weights) \
                      gives one; set one with `PipelineBuilder::threshold`, or measure one \
                      with `mfn-cli eval --save-threshold`"
                .into(),
        })?;
        let cosine = mfn_eval::cosine(a, b)
            .map_err(|e| Error::Setting(format!("cannot compare the embeddings: {e}")))?;
        Ok(Decision {
            cosine,
            threshold: t.cosine,
            same: cosine >= t.cosine,
            threshold_source: t.source.clone(),
            threshold_derivation: t.derivation.clone(),
        })
    }
}

/// Builds a [`Pipeline`] or a [`FaceAligner`]. Everything left unset comes from the
/// registry pack (`buffalo_s` unless [`PipelineBuilder::pack`] names another).
#[derive(Default)]
pub struct PipelineBuilder {
    hub: Option<Hub>,
    pack: Option<String>,
    detector_kind: Option<DetectorKind>,
    detector_weights: Option<PathBuf>,
    detector: Option<Box<dyn Detector>>,
    model: Option<PathBuf>,
    checkpoint: Option<Checkpoint>,
    threshold: Option<f64>,
    pick: Pick,
    no_flip: bool,
    scrfd_input: Option<InputSize>,
    min_face: Option<f32>,
    device: Option<Device>,
    without_detector: bool,
}

impl PipelineBuilder {
    /// Where pinned files are found [default: [`Hub::from_env`]].
    pub fn hub(mut self, hub: Hub) -> Self {
        self.hub = Some(hub);
        self
    }

    /// A registry pack that supplies what is not set otherwise [default: `buffalo_s`].
    pub fn pack(mut self, name: &str) -> Self {
        self.pack = Some(name.to_string());
        self
    }

    /// The detector network [default: the pack's, or what the weights' path says].
    pub fn detector(mut self, kind: DetectorKind) -> Self {
        self.detector_kind = Some(kind);
        self
    }

    /// The detector's weights: a file, or MTCNN's folder [default: the pinned ones].
    pub fn detector_weights(mut self, path: &Path) -> Self {
        self.detector_weights = Some(path.to_path_buf());
        self
    }

    /// A detector already loaded (any [`Detector`], one of your own included).
    pub fn detector_instance(mut self, detector: Box<dyn Detector>) -> Self {
        self.detector = Some(detector);
        self
    }

    /// The recognition model: a file (native `.safetensors`, `.onnx`, MXNet
    /// `*-symbol.json`, PyTorch `.pt`) or a registry model name [default: the pack's].
    pub fn model(mut self, model: impl AsRef<Path>) -> Self {
        self.model = Some(model.as_ref().to_path_buf());
        self
    }

    /// A recognition model already loaded.
    pub fn checkpoint(mut self, checkpoint: Checkpoint) -> Self {
        self.checkpoint = Some(checkpoint);
        self
    }

    /// The verification threshold, a cosine [default: the model's metadata, else the
    /// registry's threshold for its weights].
    pub fn threshold(mut self, cosine: f64) -> Self {
        self.threshold = Some(cosine);
        self
    }

    /// Which faces of a photo are kept [default: [`Pick::Central`]].
    pub fn pick(mut self, pick: Pick) -> Self {
        self.pick = pick;
        self
    }

    /// Whether each face is embedded together with its mirror image, insightface's flip
    /// test [default: true].
    pub fn flip(mut self, flip: bool) -> Self {
        self.no_flip = !flip;
        self
    }

    /// How SCRFD sizes photos [default: [`crate::scrfd::ScrfdOptions::default`]].
    pub fn scrfd_input(mut self, input: InputSize) -> Self {
        self.scrfd_input = Some(input);
        self
    }

    /// For MTCNN and RetinaFace: the smallest face looked for, in pixels [default: 20].
    pub fn min_face(mut self, pixels: f32) -> Self {
        self.min_face = Some(pixels);
        self
    }

    /// No detector: the pipeline embeds and compares crops that are already aligned
    /// ([`Pipeline::embed_crops`], [`Pipeline::decide`]), and needs no detector weights.
    pub fn without_detector(mut self) -> Self {
        self.without_detector = true;
        self
    }

    /// Where the networks run [default: the CPU].
    pub fn device(mut self, device: &Device) -> Self {
        self.device = Some(device.clone());
        self
    }

    fn hub_ref(&mut self) -> Result<&Hub> {
        if self.hub.is_none() {
            self.hub = Some(Hub::from_env()?);
        }
        Ok(self.hub.as_ref().expect("set above"))
    }

    fn pack_name(&self) -> &str {
        self.pack.as_deref().unwrap_or(mfn_hub::DEFAULT_PACK)
    }

    fn load_detector(&mut self) -> Result<Box<dyn Detector>> {
        if let Some(d) = self.detector.take() {
            return Ok(d);
        }
        let device = self.device.clone().unwrap_or(Device::Cpu);
        let kind = match (self.detector_kind, &self.detector_weights) {
            (Some(k), _) => k,
            (None, Some(path)) => DetectorKind::of_path(path)?,
            (None, None) => {
                let pack = self.pack_name().to_string();
                let network = self
                    .hub_ref()?
                    .registry
                    .pack(&pack)?
                    .detector_network
                    .clone();
                DetectorKind::from_name(&network).ok_or_else(|| {
                    Error::Setting(format!(
                        "pack `{pack}`: unknown detector network `{network}`"
                    ))
                })?
            }
        };
        let path = match (kind, self.detector_weights.clone()) {
            (_, Some(path)) => path,
            (DetectorKind::Scrfd, None) => {
                let pack = self.pack_name().to_string();
                let hub = self.hub_ref()?;
                let names = hub.registry.pack(&pack)?.detector.clone();
                hub.first_at_hand(&names)?.path
            }
            (kind, None) => kind.pinned_path(self.hub_ref()?)?,
        };
        if let Some(min_face) = self.min_face {
            if kind == DetectorKind::Scrfd {
                return Err(Error::Setting(
                    "SCRFD has no smallest-face setting: its score threshold decides".into(),
                ));
            }
            if !(0.0..=10_000.0).contains(&min_face) {
                return Err(Error::Setting(format!(
                    "smallest face {min_face} is not in 0..=10000 pixels"
                )));
            }
        }
        Ok(match kind {
            DetectorKind::Scrfd => {
                let mut scrfd = Scrfd::load(&path, &device)?;
                if let Some(input) = self.scrfd_input {
                    scrfd.options.input = input;
                }
                Box::new(scrfd)
            }
            DetectorKind::Mtcnn => {
                let mut m = Mtcnn::load(&path, &device)?;
                if let Some(min_face) = self.min_face {
                    m.options.min_face = min_face;
                }
                Box::new(m)
            }
            DetectorKind::RetinaFace => {
                let mut r = RetinaFace::load(&path, &device)?;
                if let Some(min_face) = self.min_face {
                    r.options.min_face = min_face;
                }
                Box::new(r)
            }
        })
    }

    /// Only the detector and the alignment, for crops of `size` (width, height): what
    /// cutting faces out of photos needs, without a recognition model.
    pub fn build_aligner(mut self, size: [u32; 2]) -> Result<FaceAligner> {
        let detector = self.load_detector()?;
        FaceAligner::new(detector, size, self.pick)
    }

    /// Loads the detector, the model and its threshold.
    pub fn build(mut self) -> Result<Pipeline> {
        let device = self.device.clone().unwrap_or(Device::Cpu);
        let checkpoint = match self.checkpoint.take() {
            Some(c) => c,
            None => {
                let spec = match self.model.clone() {
                    Some(m) => m,
                    None => {
                        let pack = self.pack_name().to_string();
                        PathBuf::from(&self.hub_ref()?.registry.pack(&pack)?.model)
                    }
                };
                self.load_checkpoint(&spec)?
            }
        };
        let model = checkpoint.build_with_dtype(&device, DType::F32)?;
        let threshold = match self.threshold {
            Some(cosine) => {
                if !cosine.is_finite() || !(-1.0..=1.0).contains(&cosine) {
                    return Err(Error::Setting(format!(
                        "threshold {cosine} is not a cosine in -1..=1"
                    )));
                }
                Some(Threshold {
                    cosine,
                    source: "given by the caller".into(),
                    derivation: "given by the caller".into(),
                })
            }
            None => {
                let registry = &self.hub_ref()?.registry;
                find_threshold(registry, &checkpoint)?.map(|t| {
                    // A registry model's converted copy carries its entry's threshold in
                    // its metadata, with a derivation that names the entry.
                    let entry = t
                        .derivation
                        .strip_prefix("registry entry `")
                        .and_then(|r| r.split_once('`'))
                        .map(|(name, _)| name.to_string());
                    let source = match (&t.origin, entry) {
                        (ThresholdOrigin::Registry { entry }, _) => {
                            format!("registry entry `{entry}`")
                        }
                        (ThresholdOrigin::Metadata, Some(entry)) => {
                            format!("registry entry `{entry}`")
                        }
                        (ThresholdOrigin::Metadata, None) => {
                            format!("the metadata of {}", checkpoint.source.display())
                        }
                    };
                    Threshold {
                        cosine: t.cosine,
                        source,
                        derivation: t.derivation,
                    }
                })
            }
        };
        let [h, w] = model.config().input_size;
        let aligner = if self.without_detector {
            None
        } else {
            let detector = self.load_detector()?;
            Some(FaceAligner::new(detector, [w as u32, h as u32], self.pick)?)
        };
        Ok(Pipeline {
            aligner,
            model,
            model_source: checkpoint.source.clone(),
            threshold,
            flip: !self.no_flip,
        })
    }

    /// A model by file, or by registry name (a bare word that is no file), converted to
    /// the native format on first use.
    fn load_checkpoint(&mut self, spec: &Path) -> Result<Checkpoint> {
        let bare = !spec.exists() && spec.components().count() == 1 && spec.extension().is_none();
        if bare {
            let name = spec.display().to_string();
            let hub = self.hub_ref()?;
            hub.registry.get_kind(&name, Kind::Model)?;
            return Ok(hub.model(&name)?.checkpoint);
        }
        Ok(Checkpoint::load(spec, None, &Device::Cpu)?)
    }
}
