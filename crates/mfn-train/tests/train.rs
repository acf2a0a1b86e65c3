//! Training on a few real LFW identities: the loss falls, runs are reproducible, an
//! interrupted run resumes bit for bit, and damaged checkpoints are clear errors.

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use common::asset;
use mfn_data::{Dataset, ImageFolder};
use mfn_loss::CombinedMargin;
use mfn_model::Config;
use mfn_train::{
    BatchPlan, Budget, Decay, Event, LrSchedule, OptimizerKind, TrainBatches, TrainConfig, Trainer,
    WeightDecay,
};

const PEOPLE: [&str; 4] = [
    "Colin_Powell",
    "Donald_Rumsfeld",
    "George_W_Bush",
    "Tony_Blair",
];

/// `per_person` aligned LFW images of each of [`PEOPLE`], one folder each.
fn tiny_set(dir: &Path, per_person: usize) -> ImageFolder {
    for name in PEOPLE {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for i in 1..=per_person {
            let file = format!("{name}_{i:04}.jpg");
            std::fs::copy(
                asset(&format!("lfw/aligned-112x112/{name}/{file}")),
                to.join(&file),
            )
            .unwrap();
        }
    }
    ImageFolder::open(dir).unwrap()
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        model: Config::paper().with_width(0.25),
        margin: CombinedMargin::arcface(32.0, 0.3),
        sub_centers: 1,
        classes: PEOPLE.len(),
        batch_size: 8,
        steps,
        seed: 7,
        flip: true,
        optimizer: OptimizerKind::Sgd { momentum: 0.9 },
        weight_decay: WeightDecay::default(),
        schedule: LrSchedule {
            base_lr: 0.05,
            warmup_steps: 2,
            total_steps: steps,
            decay: Decay::Cosine { min_lr: 0.0 },
        },
        eval_every: 0,
        save_every: 0,
    }
}

fn losses(trainer: &mut Trainer, data: &ImageFolder, out: &Path, stop: Option<usize>) -> Vec<u32> {
    let mut seen = Vec::new();
    trainer
        .fit(
            Arc::new(data.clone()),
            &[],
            out,
            Budget {
                steps: stop,
                time: None,
            },
            |e| {
                if let Event::Step(m) = e {
                    seen.push(m.loss.to_bits());
                }
            },
        )
        .unwrap();
    seen
}

#[test]
fn interrupted_run_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_set(&dir.path().join("data"), 4);
    let device = Device::Cpu;

    let whole = losses(
        &mut Trainer::new(config(6), None, &device).unwrap(),
        &data,
        &dir.path().join("whole"),
        None,
    );
    assert_eq!(whole.len(), 6);

    let out = dir.path().join("split");
    let mut first = Trainer::new(config(6), None, &device).unwrap();
    let mut split = losses(&mut first, &data, &out, Some(4));
    assert_eq!(first.step(), 4);
    drop(first);
    let mut resumed = Trainer::resume(&out.join("last.safetensors"), &device).unwrap();
    assert_eq!(resumed.step(), 4);
    split.extend(losses(&mut resumed, &data, &out, None));
    assert_eq!(split, whole, "losses of the resumed run differ");

    // The metrics file holds every step of both halves.
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().filter(|l| l.contains("\"step\"")).count(), 6);

    // The checkpoint is also a plain model file, and it carries the BatchNorm running
    // statistics that train mode updated (they start at mean 0, variance 1).
    let ckpt = mfn_model::Checkpoint::load(&out.join("last.safetensors"), None, &device).unwrap();
    assert_eq!(ckpt.config, config(6).model);
    for name in ["conv_1_batchnorm_moving_mean", "fc1_moving_var"] {
        let v: Vec<f32> = ckpt.tensors[name].to_vec1().unwrap();
        let start = if name.ends_with("var") { 1.0 } else { 0.0 };
        assert!(
            v.iter().any(|x| (x - start).abs() > 1e-3),
            "{name} never moved"
        );
    }
    assert!(ckpt.tensors.contains_key("head.weight"));
    assert!(ckpt.tensors.keys().any(|k| k.starts_with("optim.")));
    ckpt.build(&device).unwrap();
}

#[test]
fn loss_falls_on_real_faces() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_set(&dir.path().join("data"), 8);
    let mut c = config(40);
    c.schedule.base_lr = 0.1;
    let mut t = Trainer::new(c, None, &Device::Cpu).unwrap();
    let seen: Vec<f32> = losses(&mut t, &data, &dir.path().join("out"), None)
        .into_iter()
        .map(f32::from_bits)
        .collect();
    let head: f32 = seen[..5].iter().sum::<f32>() / 5.0;
    let tail: f32 = seen[seen.len() - 5..].iter().sum::<f32>() / 5.0;
    assert!(tail < 0.7 * head, "loss {head} -> {tail}: {seen:?}");
}

#[test]
fn batches_depend_only_on_seed_and_step() {
    let dir = tempfile::tempdir().unwrap();
    let data: Arc<dyn Dataset + Send + Sync> = Arc::new(tiny_set(dir.path(), 4));
    let plan = BatchPlan {
        batch_size: 4,
        seed: 3,
        flip: true,
        size: [112, 112],
    };
    let (order0, flips0) = plan.epoch(16, 0);
    let (order1, _) = plan.epoch(16, 1);
    assert_ne!(order0, order1, "each epoch is shuffled anew");
    let mut sorted = order0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..16).collect::<Vec<_>>());
    assert!(flips0.iter().any(|f| *f) && flips0.iter().any(|f| !*f));

    let all: Vec<_> = TrainBatches::new(data.clone(), plan.clone(), 0, 2, Device::Cpu)
        .unwrap()
        .take(6)
        .map(|b| b.unwrap())
        .collect();
    let late: Vec<_> = TrainBatches::new(data, plan, 5, 2, Device::Cpu)
        .unwrap()
        .take(1)
        .map(|b| b.unwrap())
        .collect();
    assert_eq!(late[0].step, 5);
    let pixels = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(pixels(&late[0].images), pixels(&all[5].images));
    assert_eq!(
        late[0].labels.to_vec1::<u32>().unwrap(),
        all[5].labels.to_vec1::<u32>().unwrap()
    );
}

#[test]
fn bad_checkpoints_and_settings_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::Cpu;
    // A model file without training state.
    let plain = dir.path().join("plain.safetensors");
    mfn_model::Checkpoint::load(
        &asset("models/mobilefacenet-y1/model-symbol.json"),
        None,
        &device,
    )
    .unwrap()
    .save(&plain)
    .unwrap();
    let err = Trainer::resume(&plain, &device).err().unwrap();
    assert!(err.to_string().contains("mfn.train.config"), "{err}");
    assert!(err.to_string().contains("plain.safetensors"), "{err}");

    // A cut training checkpoint.
    let t = Trainer::new(config(2), None, &device).unwrap();
    let good = dir.path().join("good.safetensors");
    t.save(&good).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = Trainer::resume(&cut, &device).err().unwrap();
    assert!(err.to_string().contains("cut.safetensors"), "{err}");
    Trainer::resume(&good, &device).unwrap();

    // Settings that cannot train.
    let mut c = config(2);
    c.batch_size = 1;
    assert!(Trainer::new(c, None, &device).is_err());
    let mut c = config(2);
    c.schedule.base_lr = f64::NAN;
    assert!(Trainer::new(c, None, &device).is_err());
    // A data set whose class count differs from the head's.
    let data = tiny_set(&dir.path().join("data"), 4);
    let mut c = config(2);
    c.classes = 7;
    let mut t = Trainer::new(c, None, &device).unwrap();
    let err = t
        .fit(
            Arc::new(data),
            &[],
            &dir.path().join("o"),
            Budget::default(),
            |_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("classes"), "{err}");
}

#[test]
fn a_resume_from_an_older_checkpoint_logs_each_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_set(&dir.path().join("data"), 4);
    let device = Device::Cpu;
    let out = dir.path().join("run");
    let ckpt = out.join("last.safetensors");
    let mut t = Trainer::new(config(6), None, &device).unwrap();
    losses(&mut t, &data, &out, Some(2));
    // A run killed at step 4 whose last checkpoint holds step 2.
    let at_2 = std::fs::read(&ckpt).unwrap();
    losses(&mut t, &data, &out, Some(2));
    drop(t);
    std::fs::write(&ckpt, at_2).unwrap();
    let mut t = Trainer::resume(&ckpt, &device).unwrap();
    assert_eq!(t.step(), 2);
    losses(&mut t, &data, &out, None);
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| v["metrics"]["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "only the checkpoint and the log: {names:?}");
}

#[test]
fn a_finished_run_extends_to_a_new_total() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_set(&dir.path().join("data"), 4);
    let device = Device::Cpu;
    let out = dir.path().join("run");
    let settings = mfn_train::DataSettings {
        path: Some(dir.path().join("data")),
        min_images: 4,
        hold_out: None,
        ..Default::default()
    };
    let mut t = Trainer::new(config(3), None, &device).unwrap();
    t.set_data(Some(settings.clone()));
    assert_eq!(losses(&mut t, &data, &out, None).len(), 3);
    let ckpt = out.join("last.safetensors");
    // The settings, data included, come back from the header alone.
    let saved = Trainer::saved_settings(&ckpt).unwrap();
    assert_eq!(
        (saved.config, saved.step, saved.data),
        (config(3), 3, Some(settings.clone()))
    );

    let mut t = Trainer::resume(&ckpt, &device).unwrap();
    assert_eq!(t.data(), Some(&settings));
    assert!(losses(&mut t, &data, &out, None).is_empty());
    assert!(t.set_steps(3).is_err());
    t.set_steps(5).unwrap();
    assert_eq!(t.config().schedule.total_steps, 5);
    assert_eq!(losses(&mut t, &data, &out, None).len(), 2);
    assert_eq!(Trainer::saved_settings(&ckpt).unwrap().step, 5);
}

#[test]
fn a_checkpoint_whose_settings_outgrow_its_tensors_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::Cpu;
    let good = dir.path().join("good.safetensors");
    Trainer::new(config(2), None, &device)
        .unwrap()
        .save(&good)
        .unwrap();
    let rewrite = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut ckpt = mfn_model::Checkpoint::load(&good, None, &device).unwrap();
        let mut c: serde_json::Value =
            serde_json::from_str(&ckpt.metadata["mfn.train.config"]).unwrap();
        edit(&mut c);
        ckpt.metadata
            .insert("mfn.train.config".into(), c.to_string());
        let path = dir.path().join(name);
        ckpt.save(&path).unwrap();
        path
    };
    // A billion classes would be a 1e9 x 512 head: refused by the stored head's shape.
    let huge = rewrite("huge.safetensors", &|c| {
        c["classes"] = 1_000_000_000u64.into()
    });
    let err = Trainer::resume(&huge, &device).err().unwrap().to_string();
    assert!(
        err.contains("head.weight") && err.contains("huge.safetensors"),
        "{err}"
    );
    assert_eq!(
        Trainer::saved_settings(&huge).unwrap().config.classes,
        1_000_000_000
    );
    let overflow = rewrite("overflow.safetensors", &|c| {
        c["classes"] = u64::MAX.into();
        c["sub_centers"] = 2.into();
    });
    let err = Trainer::resume(&overflow, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("overflow"), "{err}");
    // A network wider than the weights the file holds.
    let wide = rewrite("wide.safetensors", &|c| {
        c["model"]["last_channels"] = 8192.into();
    });
    let err = Trainer::resume(&wide, &device).err().unwrap().to_string();
    assert!(err.contains("different networks"), "{err}");
    // With the model metadata widened as well (the loader or the resume refuses it).
    let mut ckpt = mfn_model::Checkpoint::load(&wide, None, &device).unwrap();
    ckpt.config.last_channels = 8192;
    let wider = dir.path().join("wider.safetensors");
    ckpt.save(&wider).unwrap();
    let err = Trainer::resume(&wider, &device).err().unwrap().to_string();
    assert!(
        (err.contains("parameters") || err.contains("shape")) && err.contains("wider.safetensors"),
        "{err}"
    );
    // Not a safetensors file at all.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, u64::MAX.to_le_bytes()).unwrap();
    let err = Trainer::saved_settings(&junk).err().unwrap().to_string();
    assert!(err.contains("junk.safetensors"), "{err}");
}
