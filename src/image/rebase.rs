//! `rebase`: swap an image's base for another, as `crane rebase` does.
//!
//! The old base's layers must be the first layers of the image. The result
//! is the new base's layers followed by the image's own (those after the
//! old base's); its config is the image's with `rootfs.diff_ids` and
//! `history` spliced the same way (the new base's entries, then the image's
//! after the old base's). No layer is rebuilt: each blob comes from the
//! image it belongs to, so a push into the same registry mounts it.

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::image::compose::{self, Composed, Part};
use crate::image::manifest::media;
use crate::image::Image;

/// Annotations naming an image's base (OCI image spec).
pub const BASE_NAME: &str = "org.opencontainers.image.base.name";
/// The base image's manifest digest.
pub const BASE_DIGEST: &str = "org.opencontainers.image.base.digest";

/// `image` with `old`'s layers replaced by `new`'s. `new_name`, when given,
/// is recorded with `new`'s digest as the base annotations of an OCI
/// manifest.
pub fn rebase(image: &Image, old: &Image, new: &Image, new_name: Option<&str>) -> Result<Composed> {
    let layers = image.layers()?;
    let old_layers = old.layers()?;
    if old_layers.len() > layers.len() {
        return Err(Error::invalid(
            format!("old base {}", old.digest()),
            format!(
                "has {} layers, image {} only {}: it is not the image's base",
                old_layers.len(),
                image.digest(),
                layers.len()
            ),
        ));
    }
    for (i, (mine, theirs)) in layers.iter().zip(&old_layers).enumerate() {
        let same_tar = mine.diff_id.is_some() && mine.diff_id == theirs.diff_id;
        if mine.digest != theirs.digest && !same_tar {
            return Err(Error::invalid(
                format!("old base {}", old.digest()),
                format!(
                    "its layer {i} is {}, but layer {i} of image {} is {}: it is not the image's base",
                    theirs.digest,
                    image.digest(),
                    mine.digest
                ),
            ));
        }
    }
    let keep = old_layers.len();
    let (mut config, mut manifest) = compose::editable(image)?;
    let (old_config, _) = compose::editable(old)?;
    let (new_config, _) = compose::editable(new)?;
    let platform = |c: &Value| {
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        let mut p = format!("{}/{}", s("os"), s("architecture"));
        if !s("variant").is_empty() {
            p = format!("{p}/{}", s("variant"));
        }
        p
    };
    if platform(&new_config) != platform(&config) {
        return Err(Error::invalid(
            format!("new base {}", new.digest()),
            format!(
                "is for {}, image {} for {}",
                platform(&new_config),
                image.digest(),
                platform(&config)
            ),
        ));
    }

    let diff_ids = |c: &Value| -> Vec<Value> {
        c["rootfs"]["diff_ids"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let mut ids = diff_ids(&new_config);
    ids.extend(diff_ids(&config).into_iter().skip(keep));
    config["rootfs"] = json!({ "type": "layers", "diff_ids": ids });

    let history = |c: &Value| c["history"].as_array().cloned();
    if let Some(own) = history(&config) {
        let skip = history(&old_config).map_or(0, |h| h.len());
        let mut h = history(&new_config).unwrap_or_default();
        h.extend(own.into_iter().skip(skip));
        config["history"] = json!(h);
    }

    let mt = image.raw.media_type.clone();
    let mut parts = new
        .layers()?
        .iter()
        .map(|l| Part::existing(l, &mt))
        .collect::<Result<Vec<_>>>()?;
    for l in &layers[keep..] {
        parts.push(Part::existing(l, &mt)?);
    }
    if let (Some(name), true) = (new_name, mt == media::OCI_MANIFEST) {
        let a = &mut manifest["annotations"];
        if !a.is_object() {
            *a = json!({});
        }
        a[BASE_NAME] = json!(name);
        a[BASE_DIGEST] = json!(new.digest());
    }
    compose::compose(&mt, manifest, compose::config_bytes(&config), parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::Compression;
    use crate::image::{mutate, newlayer};

    fn layer(files: &[(&str, &str)]) -> newlayer::LocalLayer {
        let d = tempfile::tempdir().unwrap();
        for (p, c) in files {
            std::fs::write(d.path().join(p), c).unwrap();
        }
        newlayer::layer_from_dir(d.path(), Compression::Gzip).unwrap()
    }

    #[test]
    fn splices_layers_diff_ids_and_history() {
        let empty = mutate::empty(&"linux/amd64".parse().unwrap()).unwrap();
        let base1 = mutate::append(&empty, vec![layer(&[("b", "1")])]).unwrap();
        let base2 =
            mutate::append(&empty, vec![layer(&[("b", "2")]), layer(&[("c", "2")])]).unwrap();
        let app = mutate::append(&base1, vec![layer(&[("app", "x")])]).unwrap();

        let r = rebase(&app, &base1, &base2, Some("example.com/base:2")).unwrap();
        let digests =
            |i: &Image| -> Vec<_> { i.layers().unwrap().into_iter().map(|l| l.digest).collect() };
        let mut want = digests(&base2);
        want.push(digests(&app)[1].clone());
        assert_eq!(digests(&r.image), want);
        let cfg = r.image.config_file().unwrap();
        let ids = |i: &Image| i.config_file().unwrap().rootfs().diff_ids().clone();
        let mut want_ids = ids(&base2);
        want_ids.push(ids(&app)[1].clone());
        assert_eq!(cfg.rootfs().diff_ids(), &want_ids);
        assert_eq!(cfg.history().as_ref().unwrap().len(), 3);
        let a = r.image.manifest.annotations().clone().unwrap();
        assert_eq!(a[BASE_NAME], "example.com/base:2");
        assert_eq!(a[BASE_DIGEST], base2.digest().as_str());

        let err = rebase(&app, &base2, &base1, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("layer 0"), "{err}");
        assert!(err.contains(base2.digest().as_str()), "{err}");
        let err = rebase(&base1, &app, &base2, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("has 2 layers"), "{err}");
    }
}
