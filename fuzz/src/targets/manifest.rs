//! Manifests, indexes and configs as a registry serves them:
//! `RawManifest::new` (with each Content-Type the client may see), then
//! `.image()` / `.index()`, the descriptor helpers the mount uses on them,
//! and `ImageConfiguration`. What parses serializes and parses back equal.

use bytes::Bytes;
use ggfs::formats::layerindex;
use ggfs::image::manifest::{self, media, Compression, ImageConfiguration, Parsed, Platform};
use ggfs::{Digest, RawManifest};

const CONTENT_TYPES: [Option<&str>; 6] = [
    None,
    Some(media::OCI_MANIFEST),
    Some(media::OCI_INDEX),
    Some(media::DOCKER_MANIFEST),
    Some("application/vnd.docker.distribution.manifest.list.v2+json; charset=utf-8"),
    Some("text/plain"),
];

fn descriptors(descs: &[manifest::Descriptor]) {
    for d in descs {
        let _ = manifest::digest_of(d);
        let mt = manifest::media_type_of(d);
        let _ = Compression::of_media_type(&mt);
        let _ = ggfs::image::is_layer_media_type(&mt);
        let _ = layerindex::is_plain(d);
        if let Some(p) = d.platform() {
            let ours = Platform::of(p);
            assert!(
                ours.matches(p),
                "{ours:?} does not match the platform it came from"
            );
            let _ = ours.dir_name();
            let _ = ours.to_string().parse::<Platform>();
        }
    }
}

/// One input.
pub fn run(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let ct = CONTENT_TYPES[sel as usize % CONTENT_TYPES.len()];
    if sel as usize / CONTENT_TYPES.len() % 2 == 1 {
        // The config blob of an image.
        if let Ok(cfg) = serde_json::from_slice::<ImageConfiguration>(body) {
            for d in cfg.rootfs().diff_ids() {
                let _ = Digest::parse(d);
            }
            let json = serde_json::to_vec(&cfg).expect("a parsed config serializes");
            let again: ImageConfiguration =
                serde_json::from_slice(&json).expect("a serialized config parses");
            assert_eq!(again, cfg);
        }
        return;
    }
    let bytes = Bytes::copy_from_slice(body);
    let Ok(raw) = RawManifest::new(bytes, ct) else {
        return;
    };
    assert_eq!(raw.digest, Digest::of(body));
    assert!(media::is_index(&raw.media_type) || media::is_manifest(&raw.media_type));
    assert_eq!(raw.is_index(), media::is_index(&raw.media_type));
    assert_eq!(raw.descriptor().size(), body.len() as u64);
    let _ = layerindex::listed(&raw);
    match raw.parse() {
        Ok(Parsed::Image(m)) => {
            assert!(!raw.is_index());
            assert!(raw.index().is_err());
            let again = raw.image().expect("parsed once, parses again");
            assert_eq!(again, m);
            descriptors(m.layers());
            descriptors(std::slice::from_ref(m.config()));
            let json = serde_json::to_vec(&m).expect("a parsed manifest serializes");
            let back = RawManifest::new(json.into(), Some(&raw.media_type))
                .and_then(|r| r.image())
                .expect("a serialized manifest parses");
            assert_eq!(back, m);
        }
        Ok(Parsed::Index(i)) => {
            assert!(raw.is_index());
            assert!(raw.image().is_err());
            let again = raw.index().expect("parsed once, parses again");
            assert_eq!(again, i);
            descriptors(i.manifests());
            let json = serde_json::to_vec(&i).expect("a parsed index serializes");
            let back = RawManifest::new(json.into(), Some(&raw.media_type))
                .and_then(|r| r.index())
                .expect("a serialized index parses");
            assert_eq!(back, i);
        }
        Err(_) => {
            assert!(raw.image().is_err() && raw.index().is_err());
        }
    }
}
