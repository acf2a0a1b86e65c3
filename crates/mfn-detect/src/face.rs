//! What a detector reports, and which of several faces an answer is about.

/// A detected face: box, confidence and 5 landmarks (left eye, right eye, nose tip, left
/// and right mouth corners, as seen in the image), in the pixels of the image searched.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Face {
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    /// Face probability in `0..=1`.
    pub score: f32,
    /// The 5 landmarks, `[x, y]` each.
    pub landmarks: [[f32; 2]; 5],
}

impl Face {
    /// Box area in square pixels.
    pub fn area(&self) -> f32 {
        (self.bbox[2] - self.bbox[0]).max(0.0) * (self.bbox[3] - self.bbox[1]).max(0.0)
    }

    /// Centre of the box.
    pub fn centre(&self) -> [f32; 2] {
        [
            (self.bbox[0] + self.bbox[2]) / 2.0,
            (self.bbox[1] + self.bbox[3]) / 2.0,
        ]
    }

    /// The face scaled by `factor` about the origin: boxes and landmarks found on a
    /// resized image, mapped back to the original's pixels.
    pub fn scaled(mut self, factor: f32) -> Self {
        self.bbox.iter_mut().for_each(|v| *v *= factor);
        self.landmarks
            .iter_mut()
            .flatten()
            .for_each(|v| *v *= factor);
        self
    }

    /// insightface's `max_num` rank (`metric='default'` in `SCRFD.detect`): box area minus
    /// twice the squared distance of the box centre from the image centre, so a large
    /// face near the middle outranks a larger one at the edge. The image centre is
    /// `(width / 2, height / 2)` in whole pixels, as insightface's integer division.
    pub fn central_rank(&self, width: u32, height: u32) -> f32 {
        let [cx, cy] = self.centre();
        let dx = cx - (width / 2) as f32;
        let dy = cy - (height / 2) as f32;
        self.area() - 2.0 * (dx * dx + dy * dy)
    }
}

/// Which of the faces in a photo an answer is about.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Pick {
    /// The face insightface's `detect(max_num=1)` keeps: the best
    /// [`Face::central_rank`], box area less twice the squared offset of its centre from
    /// the photo's. Photos are framed on their subject, so a bystander at the edge loses
    /// to the subject even when the bystander's face is larger.
    #[default]
    Central,
    /// The face with the largest box.
    Largest,
    /// Every face, best score first.
    All,
}

impl Pick {
    /// The rule's name, as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Central => "central",
            Self::Largest => "largest",
            Self::All => "all",
        }
    }

    /// Parses [`Pick::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "central" => Some(Self::Central),
            "largest" => Some(Self::Largest),
            "all" => Some(Self::All),
            _ => None,
        }
    }

    /// The faces the rule keeps, in `faces` found on a `width` x `height` photo: one for
    /// [`Pick::Central`] and [`Pick::Largest`] (none when `faces` is empty), all of them,
    /// best score first, for [`Pick::All`].
    pub fn apply(self, faces: &[Face], width: u32, height: u32) -> Vec<Face> {
        let best = |key: &dyn Fn(&Face) -> f32| {
            faces
                .iter()
                .max_by(|a, b| key(a).total_cmp(&key(b)))
                .copied()
                .into_iter()
                .collect()
        };
        match self {
            Self::Central => best(&|f| f.central_rank(width, height)),
            Self::Largest => best(&|f| f.area()),
            Self::All => {
                let mut all = faces.to_vec();
                all.sort_by(|a, b| b.score.total_cmp(&a.score));
                all
            }
        }
    }
}

impl std::fmt::Display for Pick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Intersection over union of two boxes, with areas `(x2 - x1 + plus) * (y2 - y1 + plus)`:
/// `plus` is 1 for insightface's pixel-count convention, 0 for plain geometry.
pub(crate) fn iou(a: &[f32; 4], b: &[f32; 4], plus: f32) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0]) + plus).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1]) + plus).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0] + plus).max(0.0) * (r[3] - r[1] + plus).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Greedy non-maximum suppression, best score first: a face overlapping a kept one by
/// more than `threshold` IoU is dropped.
pub(crate) fn nms(mut faces: Vec<Face>, threshold: f32, plus: f32) -> Vec<Face> {
    faces.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut keep: Vec<Face> = Vec::new();
    for f in faces {
        if keep
            .iter()
            .all(|k| iou(&k.bbox, &f.bbox, plus) <= threshold)
        {
            keep.push(f);
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(bbox: [f32; 4], score: f32) -> Face {
        Face {
            bbox,
            score,
            landmarks: [[0.0; 2]; 5],
        }
    }

    #[test]
    fn central_prefers_the_subject_over_a_larger_bystander() {
        // 250x250 photo: subject 80x80 in the middle, bystander 100x100 at the edge.
        let subject = face([85.0, 85.0, 165.0, 165.0], 0.8);
        let bystander = face([150.0, 0.0, 250.0, 100.0], 0.9);
        let faces = [bystander, subject];
        assert_eq!(Pick::Central.apply(&faces, 250, 250), vec![subject]);
        assert_eq!(Pick::Largest.apply(&faces, 250, 250), vec![bystander]);
        assert_eq!(Pick::All.apply(&faces, 250, 250), vec![bystander, subject]);
        assert!(Pick::Central.apply(&[], 250, 250).is_empty());
        // The rank as insightface computes it: 6400 - 2 * (0^2 + 0^2).
        assert_eq!(subject.central_rank(250, 250), 6400.0);
        // centre (200, 50), image centre (125, 125): 10000 - 2 * (75^2 + 75^2).
        assert_eq!(bystander.central_rank(250, 250), 10000.0 - 2.0 * 11250.0);
        for p in [Pick::Central, Pick::Largest, Pick::All] {
            assert_eq!(Pick::from_name(p.name()), Some(p));
        }
    }

    #[test]
    fn nms_keeps_the_better_of_overlapping_boxes() {
        let a = face([0.0, 0.0, 10.0, 10.0], 0.9);
        let b = face([1.0, 1.0, 11.0, 11.0], 0.8);
        let c = face([20.0, 20.0, 30.0, 30.0], 0.7);
        assert_eq!(nms(vec![c, b, a], 0.4, 1.0), vec![a, c]);
        // (11 * 11 - ...) insightface's +1: 10x10 boxes one pixel apart overlap 100/142.
        assert!((iou(&a.bbox, &b.bbox, 1.0) - 100.0 / 142.0).abs() < 1e-6);
        assert!((iou(&a.bbox, &b.bbox, 0.0) - 81.0 / 119.0).abs() < 1e-6);
    }
}
