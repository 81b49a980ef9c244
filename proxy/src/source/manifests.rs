//! The manifests source: `--manifests DIR`, a directory of YAML or JSON files as
//! `kubectl get -o yaml` (or `-o json`) writes them.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in DIR is read (not subdirectories,
//! not names starting with a dot, such as editor lock files). A file may hold several
//! documents (`---`), a `kind: List` (or `ServiceList`, ... whose items may omit their
//! kind), or for JSON one or more objects. Services, Nodes, Pods and Namespaces (`v1`),
//! EndpointSlices (`discovery.k8s.io/v1`) and NetworkPolicies (`networking.k8s.io/v1`,
//! refused with the field's path where the API server would refuse them) are read.
//! Anything else (another kind or apiVersion), and objects that decode but cannot be
//! served ([`super::checks`]), are refused: logged with file, object and field, and counted
//! in `ferry_proxy_manifest_objects_refused_total`. An object without a namespace is in
//! `default`, as with `kubectl apply`.
//!
//! Each object is converted to the store's slim form as soon as it is decoded; the parsed
//! text is dropped. What is kept per file between polls is its fingerprint, a hash of its
//! content, and its slim objects, which are the very copies the store holds (shared
//! `Arc`s): an unchanged file is neither read nor parsed again, and a snapshot costs no
//! second copy of the cluster.
//!
//! The directory is polled every 200 ms (names, sizes, modification and change times,
//! inodes; symlinks followed, so a ConfigMap volume works): a change is applied well
//! within a second. Each change sends one [`Event::Snapshot`] of every kind.
//!
//! A broken file holds only itself: its last good objects stay (none if it never parsed)
//! and the other files' changes are applied. The error is sent as [`Event::Error`]
//! ([`SourceError::Manifests`]) naming the file and line, once per distinct set of errors,
//! after the snapshot. (Holding the whole directory instead, so that an edit spanning two
//! files is never half applied, let one broken file freeze every other file's updates.)
//!
//! An object (kind, namespace, name) defined in two files is taken from one: the file it
//! was running from, else the first in name order. The other is refused with a warning
//! naming both files, rather than silently replacing what runs.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::{DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tokio::sync::mpsc::Sender;
use tracing::{debug, warn};

use super::{checks, Event, Kind, Object, SourceError};

/// How often the directory is looked at.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// A file modified this recently may be modified again within the file system's
/// timestamp granularity without its metadata changing: it is read again (and re-parsed
/// only if its content differs) until it is older than this.
const SETTLE_TIME: Duration = Duration::from_secs(2);

/// Why a manifest could not be used: which file, where, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based, when the parser knows it.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

/// Reads the directory once: every object of every manifest, in file-name order, or every
/// file that failed.
pub fn read_dir(dir: &Path) -> Result<Vec<Object>, Vec<ManifestError>> {
    let mut watcher = DirWatcher::new(dir.to_path_buf());
    watcher.scan();
    watcher.result()
}

/// Polls `dir` and sends a snapshot at start and after every change, until the receiver
/// is dropped.
pub async fn run(dir: PathBuf, tx: Sender<Event>) {
    let mut watcher = DirWatcher::new(dir);
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // Reading and parsing files blocks: keep it off the async workers.
        let polled = tokio::task::spawn_blocking(move || {
            let event = watcher.poll();
            if !event.is_empty() {
                // Parsing a file builds a tree of JSON values many times the size of what
                // is kept; give those pages back (see `release_freed_memory`).
                crate::store::release_freed_memory();
            }
            (watcher, event)
        })
        .await;
        let event;
        (watcher, event) = match polled {
            Ok(polled) => polled,
            Err(e) => {
                let _ = tx
                    .send(Event::Error(SourceError::ManifestsReader(e.to_string())))
                    .await;
                return;
            }
        };
        for event in event {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// What a file looked like when it was last read.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    /// ctime and inode catch a file replaced by rename with an older mtime.
    changed: (i64, i64),
    inode: (u64, u64),
}

#[derive(Debug)]
struct CachedFile {
    fingerprint: Fingerprint,
    content_hash: u64,
    /// Read so soon after its last modification that it must be read again.
    unsettled: bool,
    /// Its objects, slim and shared with the store (see the module docs).
    parsed: Result<Vec<Object>, ManifestError>,
    /// While `parsed` is an error: the objects of its last content that parsed.
    last_good: Vec<Object>,
}

/// Remembers the directory's files between polls, so an unchanged file is neither read
/// nor parsed again.
#[derive(Debug)]
struct DirWatcher {
    dir: PathBuf,
    files: BTreeMap<PathBuf, CachedFile>,
    /// The directory itself could not be listed.
    list_error: Option<ManifestError>,
    /// Something was sent: from now on only changes are.
    sent_once: bool,
    /// The errors last sent, so the same ones are not sent again at every change of
    /// another file while the directory stays broken.
    last_errors: Option<Vec<ManifestError>>,
    /// Which file each object in the last snapshot came from: of two files defining the
    /// same object, the one it runs from keeps it.
    owners: HashMap<(Kind, String, String), PathBuf>,
}

impl DirWatcher {
    fn new(dir: PathBuf) -> DirWatcher {
        DirWatcher {
            dir,
            files: BTreeMap::new(),
            list_error: None,
            sent_once: false,
            last_errors: None,
            owners: HashMap::new(),
        }
    }

    /// Looks at the directory; returns the event to send, if anything changed. The
    /// snapshot is not compared with the last one sent (that would keep a second copy of
    /// every object): the cache already says whether a file's objects changed, and a
    /// snapshot equal to the store's content costs the store no re-planning.
    ///
    /// Returns the snapshot (when the directory could be listed), then the errors (when
    /// they differ from the last ones sent).
    fn poll(&mut self) -> Vec<Event> {
        let changed = self.scan();
        if !changed && self.sent_once {
            return Vec::new();
        }
        self.sent_once = true;
        let mut events = Vec::new();
        let errors = match &self.list_error {
            // The directory could not be listed: what its files held stays.
            Some(error) => vec![error.clone()],
            None => {
                let (objects, errors) = self.objects();
                events.push(Event::Snapshot {
                    kinds: Kind::ALL.to_vec(),
                    objects,
                });
                errors
            }
        };
        if errors.is_empty() {
            self.last_errors = None;
        } else if self.last_errors.as_ref() != Some(&errors) {
            for error in &errors {
                warn!("{error}");
            }
            self.last_errors = Some(errors.clone());
            events.push(Event::Error(SourceError::Manifests(errors)));
        }
        events
    }

    /// Brings the cache up to date with the directory; whether anything changed.
    fn scan(&mut self) -> bool {
        let names = match self.list() {
            Ok(names) => names,
            Err(error) => {
                let changed = self.list_error.as_ref() != Some(&error);
                self.list_error = Some(error);
                return changed;
            }
        };
        let mut changed = self.list_error.take().is_some();
        let before = self.files.len();
        self.files.retain(|path, _| names.contains_key(path));
        changed |= self.files.len() != before;
        for (path, fingerprint) in names {
            changed |= self.refresh(path, fingerprint);
        }
        changed
    }

    /// Reads one file if it may have changed; whether its parse result changed.
    fn refresh(&mut self, path: PathBuf, fingerprint: Fingerprint) -> bool {
        if let Some(cached) = self.files.get(&path) {
            if cached.fingerprint == fingerprint && !cached.unsettled {
                return false;
            }
        }
        let started = SystemTime::now();
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Removed between listing and reading: the next poll sees it gone.
                return false;
            }
            Err(e) => {
                let error = ManifestError {
                    file: path.clone(),
                    line: None,
                    column: None,
                    message: e.to_string(),
                };
                return self.store(path, fingerprint, 0, false, Err(error));
            }
        };
        let unsettled = fingerprint
            .modified
            .is_none_or(|m| started.duration_since(m).unwrap_or_default() < SETTLE_TIME);
        let content_hash = hash_of(&text);
        if let Some(cached) = self.files.get_mut(&path) {
            if cached.content_hash == content_hash {
                cached.fingerprint = fingerprint;
                cached.unsettled = unsettled;
                return false;
            }
        }
        let parsed = match String::from_utf8(text) {
            Ok(text) => parse_file(&path, &text),
            Err(_) => Err(ManifestError {
                file: path.clone(),
                line: None,
                column: None,
                message: "not UTF-8 text".into(),
            }),
        };
        self.store(path, fingerprint, content_hash, unsettled, parsed)
    }

    fn store(
        &mut self,
        path: PathBuf,
        fingerprint: Fingerprint,
        content_hash: u64,
        unsettled: bool,
        parsed: Result<Vec<Object>, ManifestError>,
    ) -> bool {
        let old = self.files.remove(&path);
        let changed = old.as_ref().is_none_or(|old| old.parsed != parsed);
        let last_good = match (&parsed, old) {
            (Ok(_), _) | (Err(_), None) => Vec::new(),
            (Err(_), Some(old)) => old.parsed.unwrap_or(old.last_good),
        };
        self.files.insert(
            path,
            CachedFile {
                fingerprint,
                content_hash,
                unsettled,
                parsed,
                last_good,
            },
        );
        changed
    }

    /// The manifest files in the directory with their fingerprints.
    fn list(&self) -> Result<BTreeMap<PathBuf, Fingerprint>, ManifestError> {
        use std::os::unix::fs::MetadataExt;
        let dir_error = |e: std::io::Error| ManifestError {
            file: self.dir.clone(),
            line: None,
            column: None,
            message: format!("cannot read the manifests directory: {e}"),
        };
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(dir_error)? {
            let entry = entry.map_err(dir_error)?;
            let path = entry.path();
            if !is_manifest_name(&path) {
                continue;
            }
            // Follows symlinks: a ConfigMap volume's files are links into a directory
            // that is swapped on update.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            let fingerprint = Fingerprint {
                len: meta.len(),
                modified: meta.modified().ok(),
                changed: (meta.ctime(), meta.ctime_nsec()),
                inode: (meta.dev(), meta.ino()),
            };
            out.insert(path, fingerprint);
        }
        Ok(out)
    }

    /// Every object of every file (a broken file's last good ones), each defined once,
    /// and the files' errors. Remembers which file each object came from.
    fn objects(&mut self) -> (Vec<Object>, Vec<ManifestError>) {
        let errors: Vec<ManifestError> = self
            .files
            .values()
            .filter_map(|f| f.parsed.as_ref().err().cloned())
            .collect();
        let of_file = |file: &CachedFile| match &file.parsed {
            Ok(objects) => objects.clone(),
            Err(_) => file.last_good.clone(),
        };
        // Which file each object is taken from: the one it ran from, else the first.
        let mut chosen: HashMap<(Kind, String, String), PathBuf> = HashMap::new();
        for (path, file) in &self.files {
            for object in of_file(file) {
                let (namespace, name) = object.identity();
                let key = (object.kind(), namespace.to_string(), name.to_string());
                let running = self.owners.get(&key) == Some(path);
                match chosen.get_mut(&key) {
                    None => {
                        chosen.insert(key, path.clone());
                    }
                    Some(first) if first == path => {}
                    Some(first) => {
                        let (kept, refused) = if running {
                            (path.clone(), std::mem::replace(first, path.clone()))
                        } else {
                            (first.clone(), path.clone())
                        };
                        warn!(
                            file = %refused.display(),
                            "{:?} {namespace}/{name} in {} is refused: {} defines it already \
                             (remove one of the two)",
                            object.kind(),
                            refused.display(),
                            kept.display()
                        );
                    }
                }
            }
        }
        let mut objects = Vec::new();
        for (path, file) in &self.files {
            let mut taken = std::collections::HashSet::new();
            for object in of_file(file) {
                let (namespace, name) = object.identity();
                let key = (object.kind(), namespace.to_string(), name.to_string());
                // Twice in one file: the first stays, as kubectl apply would refuse.
                if chosen.get(&key) == Some(path) && taken.insert(key) {
                    objects.push(object);
                }
            }
        }
        self.owners = chosen;
        (objects, errors)
    }

    /// Every object of every file, or every error (for one-off reads).
    fn result(&mut self) -> Result<Vec<Object>, Vec<ManifestError>> {
        if let Some(error) = &self.list_error {
            return Err(vec![error.clone()]);
        }
        let (objects, errors) = self.objects();
        if errors.is_empty() {
            Ok(objects)
        } else {
            Err(errors)
        }
    }
}

fn is_manifest_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.') && [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext))
}

fn hash_of(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// The objects in one file's text. JSON files are read with the JSON parser (YAML's is
/// fussier about tabs); everything else as YAML.
///
/// Objects that decode but cannot be served are left out, each logged with the file, the
/// object and the field, and counted in `ferry_proxy_manifest_objects_refused_total`.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, ManifestError> {
    let (objects, refused) = parse_file_checked(path, text)?;
    for r in &refused {
        warn!(
            file = %path.display(),
            object = r.object,
            field = r.field,
            "{}: {} refused: {}: {}",
            path.display(),
            r.object,
            r.field,
            r.problem
        );
    }
    crate::metrics::count_refused_objects(refused.len());
    Ok(objects)
}

/// [`parse_file`]'s objects, and the objects it refuses.
pub fn parse_file_checked(path: &Path, text: &str) -> Result<(Vec<Object>, Vec<Refusal>), ManifestError> {
    let is_json = path.extension().is_some_and(|e| e == "json");
    let error = |line: Option<usize>, column: Option<usize>, message: String| ManifestError {
        file: path.to_path_buf(),
        line,
        column,
        message,
    };
    // Documents are decoded one at a time, and a list's items one at a time (see
    // `Document`): a file of 10k objects never exists as one tree of JSON values, which
    // would cost many times what the store keeps, and leave the kept objects scattered
    // over heap pages the allocator could then not give back.
    let mut documents: Vec<Document> = Vec::new();
    if is_json {
        let mut de = serde_json::Deserializer::from_str(text);
        // `end` fails while anything but blanks is left.
        while de.end().is_err() {
            let document = Document::deserialize(&mut de)
                .map_err(|e| error(Some(e.line()), Some(e.column()), e.to_string()))?;
            documents.push(document);
        }
    } else {
        // Stop at the first error: the document iterator repeats a parse error forever.
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            let document = Document::deserialize(document).map_err(|e| {
                let location = e.location();
                error(
                    location.as_ref().map(|l| l.line()),
                    location.as_ref().map(|l| l.column()),
                    e.to_string(),
                )
            })?;
            documents.push(document);
        }
    }

    let mut objects = Vec::new();
    let mut refused = Vec::new();
    for (index, document) in documents.into_iter().enumerate() {
        collect(document, &mut objects, &mut refused).map_err(|failed| {
            // The value-based conversion knows what failed but not where: decode that
            // object again straight from the text, which gives the parser's line.
            let located = if is_json {
                locate_json(text, index, failed.item, failed.kind)
            } else {
                locate_yaml(text, index, failed.item, failed.kind)
            };
            let item = failed.item.map(|i| format!(", items[{i}]")).unwrap_or_default();
            match located {
                Some((line, column, message)) => error(Some(line), Some(column), message),
                None => error(
                    None,
                    None,
                    format!("document {}{item}: {}", index + 1, failed.message),
                ),
            }
        })?;
    }
    Ok((objects, refused))
}

/// An object of a kind we read whose fields are wrong.
struct ConversionError {
    item: Option<usize>,
    kind: Kind,
    message: String,
}

/// One document of a file, decoded: its fields but `items`, and its items, each already
/// converted when it names its own kind and apiVersion (kubectl's `List`), else kept to
/// be converted once the list's kind is known (the API's `ServiceList` leaves the items'
/// kind out, and JSON may give `items` before `kind`).
enum Document {
    /// An empty document, e.g. after a trailing `---`.
    Empty,
    NotAnObject,
    Object {
        fields: serde_json::Map<String, Value>,
        /// `None` when there is no `items` array.
        items: Option<Vec<DecodedItem>>,
    },
}

enum DecodedItem {
    Converted(Result<Converted, (Kind, String)>),
    Raw(Value),
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Document, D::Error> {
        de.deserialize_any(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Kubernetes object or list")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let mut fields = serde_json::Map::new();
        let mut items = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                items = map.next_value::<Items>()?.0;
            } else {
                fields.insert(key, map.next_value()?);
            }
        }
        Ok(Document::Object { fields, items })
    }

    fn visit_unit<E>(self) -> Result<Document, E> {
        Ok(Document::Empty)
    }

    fn visit_none<E>(self) -> Result<Document, E> {
        Ok(Document::Empty)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Document, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Document::NotAnObject)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Document, E> {
        Ok(Document::NotAnObject)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Document, E> {
        Ok(Document::NotAnObject)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Document, E> {
        Ok(Document::NotAnObject)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Document, E> {
        Ok(Document::NotAnObject)
    }

    fn visit_str<E>(self, _: &str) -> Result<Document, E> {
        Ok(Document::NotAnObject)
    }
}

/// The `items` of a document: `None` unless an array.
struct Items(Option<Vec<DecodedItem>>);

impl<'de> Deserialize<'de> for Items {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Items, D::Error> {
        de.deserialize_any(ItemsVisitor)
    }
}

struct ItemsVisitor;

impl<'de> Visitor<'de> for ItemsVisitor {
    type Value = Items;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list's items")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Items, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            let names_itself = ["kind", "apiVersion"]
                .iter()
                .all(|field| item.get(field).is_some_and(Value::is_string));
            items.push(if names_itself {
                DecodedItem::Converted(convert(item))
            } else {
                DecodedItem::Raw(item)
            });
        }
        Ok(Items(Some(items)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Items, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Items(None))
    }

    fn visit_unit<E>(self) -> Result<Items, E> {
        Ok(Items(None))
    }

    fn visit_none<E>(self) -> Result<Items, E> {
        Ok(Items(None))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Items, E> {
        Ok(Items(None))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Items, E> {
        Ok(Items(None))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Items, E> {
        Ok(Items(None))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Items, E> {
        Ok(Items(None))
    }

    fn visit_str<E>(self, _: &str) -> Result<Items, E> {
        Ok(Items(None))
    }
}

/// Adds the objects of one document (one object, or a list of them) to `out`.
fn collect(
    document: Document,
    out: &mut Vec<Object>,
    refused: &mut Vec<Refusal>,
) -> Result<(), ConversionError> {
    let mut keep = |converted: Converted| match converted {
        Converted::Object(object) => out.push(object),
        Converted::Refused(refusal) => refused.push(refusal),
    };
    let (map, items) = match document {
        Document::Empty => return Ok(()),
        Document::NotAnObject => {
            debug!("skipping a document that is not an object");
            return Ok(());
        }
        Document::Object { fields, items } => (fields, items),
    };
    let kind = map.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
    let api_version = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if kind.ends_with("List") {
        let Some(items) = items else {
            debug!(kind, "skipping a list without items");
            return Ok(());
        };
        // `ServiceList` (the API's own list) leaves the items' kind out; `List` (kubectl's)
        // keeps it.
        let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
        for (i, item) in items.into_iter().enumerate() {
            let mut item = match item {
                DecodedItem::Converted(converted) => {
                    keep(converted.map_err(|(kind, message)| ConversionError {
                        item: Some(i),
                        kind,
                        message,
                    })?);
                    continue;
                }
                DecodedItem::Raw(item) => item,
            };
            if let (Some(item_kind), Value::Object(fields)) = (item_kind, &mut item) {
                fields
                    .entry("kind")
                    .or_insert_with(|| Value::String(item_kind.to_string()));
                fields
                    .entry("apiVersion")
                    .or_insert_with(|| Value::String(api_version.clone()));
            }
            keep(convert(item).map_err(|(kind, message)| ConversionError {
                item: Some(i),
                kind,
                message,
            })?);
        }
        return Ok(());
    }
    keep(
        convert(Value::Object(map)).map_err(|(kind, message)| ConversionError {
            item: None,
            kind,
            message,
        })?,
    );
    Ok(())
}

/// An object that decoded but is not used, and why (see [`super::checks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `Kind namespace/name`.
    pub object: String,
    /// The field at fault, as a path (`spec.ports[0].port`).
    pub field: String,
    pub problem: String,
}

/// What became of one object of a manifest.
enum Converted {
    Object(Object),
    Refused(Refusal),
}

/// One object of a kind we read, in the store's form, or why it is refused.
fn convert(value: Value) -> Result<Converted, (Kind, String)> {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let object = match (api_version, kind) {
        ("v1", "Service") => decode_value::<Service>(value, Kind::Service, checks::service)?,
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            decode_value::<EndpointSlice>(value, Kind::EndpointSlice, checks::endpoint_slice)?
        }
        ("v1", "Node") => decode_value::<Node>(value, Kind::Node, checks::nothing)?,
        ("v1", "Pod") => decode_value::<Pod>(value, Kind::Pod, checks::nothing)?,
        ("v1", "Namespace") => decode_value::<Namespace>(value, Kind::Namespace, checks::nothing)?,
        // A policy the API server would refuse fails its whole file (nothing of it is
        // applied, its last good state stays): enforcing half of a policy could let
        // through what it denies.
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            Converted::Object(crate::store::policy::decode_manifest(value)?)
        }
        _ => {
            let (field, problem) = match kind {
                "Service" | "Node" | "Pod" | "Namespace" => {
                    ("apiVersion", format!("{kind} is read as v1, not {api_version:?}"))
                }
                "EndpointSlice" => (
                    "apiVersion",
                    format!("EndpointSlice is read as discovery.k8s.io/v1, not {api_version:?}"),
                ),
                "NetworkPolicy" => (
                    "apiVersion",
                    format!("NetworkPolicy is read as networking.k8s.io/v1, not {api_version:?}"),
                ),
                _ => (
                    "kind",
                    format!(
                        "{kind:?} is not read (ferry-proxy reads Service, EndpointSlice, Node, \
                         Pod, Namespace and NetworkPolicy)"
                    ),
                ),
            };
            return Ok(Converted::Refused(Refusal {
                object: object_name(kind, &value),
                field: field.into(),
                problem,
            }));
        }
    };
    Ok(object)
}

/// `Kind namespace/name` as the logs name an object (a namespaced kind without a
/// namespace is in `default`).
fn object_name(kind: &str, value: &Value) -> String {
    let name = |field| value.pointer(field).and_then(Value::as_str).unwrap_or("");
    let namespaced = ["Service", "EndpointSlice", "Pod", "NetworkPolicy"].contains(&kind);
    match name("/metadata/namespace") {
        "" if namespaced => format!("{kind} default/{}", name("/metadata/name")),
        "" => format!("{kind} {}", name("/metadata/name")),
        namespace => format!("{kind} {namespace}/{}", name("/metadata/name")),
    }
}

/// Decodes `value` as `T` and converts it at once: the k8s-openapi object lives only
/// for this call.
fn decode_value<T: DeserializeOwned>(
    value: Value,
    kind: Kind,
    check: impl Fn(&T) -> Result<(), checks::Problem>,
) -> Result<Converted, (Kind, String)>
where
    Object: From<T>,
{
    let object = object_name(&format!("{kind:?}"), &value);
    let decoded: T = serde_json::from_value(value).map_err(|e| (kind, e.to_string()))?;
    Ok(match check(&decoded) {
        Ok(()) => Converted::Object(Object::from(decoded)),
        Err((field, problem)) => Converted::Refused(Refusal {
            object,
            field,
            problem,
        }),
    })
}

/// Decodes document `index` (item `item` of its list) of a YAML text as `kind`, for the
/// error's position. `None` if that unexpectedly succeeds or gives no position.
fn locate_yaml(text: &str, index: usize, item: Option<usize>, kind: Kind) -> Option<(usize, usize, String)> {
    let document = serde_yaml_ng::Deserializer::from_str(text).nth(index)?;
    let error = decode_as(document, item, kind).err()?;
    let location = error.location()?;
    Some((location.line(), location.column(), error.to_string()))
}

fn locate_json(text: &str, index: usize, item: Option<usize>, kind: Kind) -> Option<(usize, usize, String)> {
    let mut de = serde_json::Deserializer::from_str(text);
    for _ in 0..index {
        IgnoredAny::deserialize(&mut de).ok()?;
    }
    let error = decode_as(&mut de, item, kind).err()?;
    Some((error.line(), error.column(), error.to_string()))
}

fn decode_as<'de, D: Deserializer<'de>>(de: D, item: Option<usize>, kind: Kind) -> Result<(), D::Error> {
    match kind {
        Kind::Service => decode::<Service, D>(de, item),
        Kind::EndpointSlice => decode::<EndpointSlice, D>(de, item),
        Kind::Node => decode::<Node, D>(de, item),
        Kind::Pod => decode::<Pod, D>(de, item),
        Kind::Namespace => decode::<Namespace, D>(de, item),
        Kind::NetworkPolicy => decode::<NetworkPolicy, D>(de, item),
    }
}

fn decode<'de, T: DeserializeOwned, D: Deserializer<'de>>(
    de: D,
    item: Option<usize>,
) -> Result<(), D::Error> {
    match item {
        None => T::deserialize(de).map(drop),
        Some(index) => de.deserialize_map(ListItem::<T> {
            index,
            item: PhantomData,
        }),
    }
}

/// Visits a list object and decodes only `items[index]` as `T`.
struct ListItem<T> {
    index: usize,
    item: PhantomData<T>,
}

impl<'de, T: DeserializeOwned> Visitor<'de> for ListItem<T> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "items" {
                map.next_value_seed(ListItem::<T> {
                    index: self.index,
                    item: PhantomData,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for _ in 0..self.index {
            seq.next_element::<IgnoredAny>()?;
        }
        seq.next_element::<T>()?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for ListItem<T> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<(), D::Error> {
        de.deserialize_seq(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(objects: &[Object]) -> Vec<String> {
        objects
            .iter()
            .map(|o| {
                let (ns, name) = o.identity();
                format!("{:?} {ns}/{name}", o.kind())
            })
            .collect()
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - port: 80\n";

    #[test]
    fn several_documents_and_other_kinds() {
        let text = format!(
            "---\n{SERVICE}---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: prod\n\
             addressType: IPv4\nendpoints:\n- addresses: [10.244.0.5]\n---\napiVersion: v1\nkind: Node\n\
             metadata:\n  name: node-a\n---\n"
        );
        let objects = parse_file(Path::new("a.yaml"), &text).unwrap();
        assert_eq!(
            names(&objects),
            ["Service default/web", "EndpointSlice prod/web-1", "Node /node-a"]
        );
    }

    /// Issue 10, item 7: objects that decode but cannot be served are refused, each named
    /// with its file, object and field, and counted; the good ones in the same file stay.
    #[test]
    fn objects_that_cannot_be_served_are_refused_by_field() {
        let svc = |name: &str, from: &str, to: &str| {
            SERVICE
                .replace("name: web", &format!("name: {name}"))
                .replace(from, to)
        };
        let slice = |name: &str, family: &str, address: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n\
                 addressType: {family}\nendpoints:\n- addresses: [\"{address}\"]\n"
            )
        };
        let documents = [
            svc("good", "", ""),
            svc("zero", "port: 80", "port: 0"),
            svc("big", "port: 80", "port: 70000"),
            svc("negative", "port: 80", "port: -1"),
            svc("bad-ip", "10.96.0.10", "10.96.0.300"),
            slice("garbage", "IPv4", "garbage"),
            slice("v6-in-v4", "IPv4", "fd00::5"),
            slice("good-slice", "IPv4", "10.244.0.5"),
            svc("v2", "apiVersion: v1", "apiVersion: v2"),
            "apiVersion: v1\nkind: Frobnicator\nmetadata:\n  name: f\n".to_string(),
        ];
        let text = documents.join("---\n");
        let before = crate::metrics::refused_objects();
        let path = Path::new("/m/bad.yaml");
        let (objects, refused) = parse_file_checked(path, &text).unwrap();
        assert_eq!(
            names(&objects),
            ["Service default/good", "EndpointSlice default/good-slice"]
        );
        let got: Vec<(&str, &str)> = refused
            .iter()
            .map(|r| (r.object.as_str(), r.field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("Service default/zero", "spec.ports[0].port"),
                ("Service default/big", "spec.ports[0].port"),
                ("Service default/negative", "spec.ports[0].port"),
                ("Service default/bad-ip", "spec.clusterIP"),
                ("EndpointSlice default/garbage", "endpoints[0].addresses[0]"),
                ("EndpointSlice default/v6-in-v4", "endpoints[0].addresses[0]"),
                ("Service default/v2", "apiVersion"),
                ("Frobnicator f", "kind"),
            ]
        );
        assert!(
            refused[1].problem.contains("70000 is not a port"),
            "{:?}",
            refused[1]
        );
        assert!(
            refused[5].problem.contains("not an IPv4 address"),
            "{:?}",
            refused[5]
        );
        // parse_file logs them and counts them in the metric.
        let objects = parse_file(path, &text).unwrap();
        assert_eq!(objects.len(), 2);
        assert!(crate::metrics::refused_objects() >= before + 8);
    }

    #[test]
    fn pods_and_namespaces_in_documents_and_lists() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\n\
                    apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: shop\n  labels: {app: web}\n\
                    spec:\n  nodeName: node-a\n  containers:\n  - name: web\n    image: nginx\n\
                    status:\n  phase: Running\n  podIP: 10.244.0.5\n";
        let objects = parse_file(Path::new("p.yaml"), text).unwrap();
        assert_eq!(names(&objects), ["Namespace /shop", "Pod shop/web-1"]);
        let Object::Pod(pod) = &objects[1] else {
            unreachable!()
        };
        assert_eq!(pod.ips, ["10.244.0.5".parse::<std::net::IpAddr>().unwrap()]);
        assert_eq!(pod.labels.get("app"), Some("web"));
        let Object::Namespace(ns) = &objects[0] else {
            unreachable!()
        };
        assert_eq!(ns.labels.get("kubernetes.io/metadata.name"), Some("shop"));

        // The API's own PodList, and a Pod in JSON without a namespace.
        let text = r#"{"apiVersion": "v1", "kind": "PodList", "items": [
                         {"metadata": {"name": "a", "namespace": "x"}, "spec": {"containers": []}},
                         {"metadata": {"name": "b"}, "spec": {"containers": []}}]}
                      {"apiVersion": "v1", "kind": "NamespaceList", "items": [{"metadata": {"name": "x"}}]}"#;
        assert_eq!(
            names(&parse_file(Path::new("l.json"), text).unwrap()),
            ["Pod x/a", "Pod default/b", "Namespace /x"]
        );
    }

    #[test]
    fn kubectl_lists_and_api_lists() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata:\n    name: a\n\
                    - apiVersion: v1\n  kind: ConfigMap\n  metadata:\n    name: b\nmetadata:\n  resourceVersion: \"\"\n";
        assert_eq!(
            names(&parse_file(Path::new("l.yaml"), text).unwrap()),
            ["Service default/a"]
        );
        // The API's own list type leaves kind and apiVersion out of its items.
        let text = r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                       "items": [{"metadata": {"name": "s", "namespace": "x"}, "addressType": "IPv4", "endpoints": []}]}"#;
        assert_eq!(
            names(&parse_file(Path::new("l.json"), text).unwrap()),
            ["EndpointSlice x/s"]
        );
    }

    #[test]
    fn json_with_tabs_and_several_objects() {
        let text =
            "{\n\t\"apiVersion\": \"v1\",\n\t\"kind\": \"Service\",\n\t\"metadata\": {\"name\": \"a\"}\n}\n\
                    {\"apiVersion\": \"v1\", \"kind\": \"Node\", \"metadata\": {\"name\": \"n\"}}\n";
        assert_eq!(
            names(&parse_file(Path::new("x.json"), text).unwrap()),
            ["Service default/a", "Node /n"]
        );
    }

    #[test]
    fn a_syntax_error_names_the_line() {
        let text = format!("{SERVICE}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [broken\n");
        let error = parse_file(Path::new("/m/bad.yaml"), &text).unwrap_err();
        assert_eq!(error.file, Path::new("/m/bad.yaml"));
        // libyaml notices the unclosed sequence at the end of the text, and says where it began.
        assert_eq!(error.line, Some(14), "{error}");
        assert!(error.message.contains("line 13"), "{error}");
        assert!(error.to_string().starts_with("/m/bad.yaml:1"), "{error}");

        let error = parse_file(Path::new("bad.json"), "{\n  \"kind\": \"Service\",\n  oops\n}").unwrap_err();
        assert_eq!(error.line, Some(3), "{error}");
    }

    #[test]
    fn a_type_error_names_the_line() {
        let text = format!(
            "{SERVICE}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: b\nspec:\n  ports:\n  - port: eighty\n"
        );
        let error = parse_file(Path::new("t.yaml"), &text).unwrap_err();
        assert_eq!(error.line, Some(16), "{error}");
        assert!(
            error.message.contains("eighty") || error.message.contains("invalid"),
            "{error}"
        );

        // Inside a list: the item's own line.
        let text =
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata:\n    name: n\n\
                    - apiVersion: v1\n  kind: Service\n  spec:\n    ports: 7\n";
        let error = parse_file(Path::new("t.yaml"), text).unwrap_err();
        assert_eq!(error.line, Some(11), "{error}");

        let text = "[1]\n{\"apiVersion\": \"v1\", \"kind\": \"Service\",\n \"spec\": {\"ports\": [{\"port\": \"x\"}]}}";
        let error = parse_file(Path::new("t.json"), text).unwrap_err();
        assert_eq!(error.line, Some(3), "{error}");
    }

    #[test]
    fn read_dir_reads_only_manifests_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        let service = |name: &str| SERVICE.replace("name: web", &format!("name: {name}"));
        std::fs::write(dir.path().join("b.yml"), service("b")).unwrap();
        std::fs::write(dir.path().join("a.yaml"), service("a")).unwrap();
        std::fs::write(
            dir.path().join("c.json"),
            r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"c"}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not: a manifest").unwrap();
        std::fs::write(dir.path().join(".#a.yaml"), "{{{ lock file").unwrap();
        std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();
        let objects = read_dir(dir.path()).unwrap();
        assert_eq!(
            names(&objects),
            ["Service default/a", "Service default/b", "Node /c"]
        );
    }

    #[test]
    fn polling_sends_changes_once_and_holds_on_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("web.yaml");
        std::fs::write(&file, SERVICE).unwrap();
        let mut watcher = DirWatcher::new(dir.path().to_path_buf());

        let [Event::Snapshot { kinds, objects }] = &watcher.poll()[..] else {
            panic!("no first snapshot")
        };
        assert_eq!(*kinds, Kind::ALL);
        assert_eq!(names(objects), ["Service default/web"]);
        assert_eq!(watcher.poll(), [], "nothing changed");

        // Broken: an error naming the file and line; the file's last good objects stay.
        std::fs::write(&file, SERVICE.replace("10.96.0.10", "10.96.0.10: oops")).unwrap();
        let [Event::Snapshot { objects, .. }, Event::Error(error)] = &watcher.poll()[..] else {
            panic!("no snapshot and error")
        };
        assert_eq!(names(objects), ["Service default/web"], "the last good web.yaml");
        let message = error.to_string();
        assert!(message.contains(&format!("{}:6:", file.display())), "{message}");
        assert_eq!(watcher.poll(), [], "the same error is sent once");

        // Another file added meanwhile is applied; the broken one still holds its last
        // good state, and its error is not sent again.
        std::fs::write(
            dir.path().join("db.yaml"),
            SERVICE.replace("name: web", "name: db"),
        )
        .unwrap();
        let [Event::Snapshot { objects, .. }] = &watcher.poll()[..] else {
            panic!("the other file is not held back by the broken one")
        };
        assert_eq!(names(objects), ["Service default/db", "Service default/web"]);

        // Fixed: one snapshot with both files.
        std::fs::write(&file, SERVICE.replace("port: 80", "port: 81")).unwrap();
        let [Event::Snapshot { objects, .. }] = &watcher.poll()[..] else {
            panic!("no snapshot after the fix")
        };
        assert_eq!(names(objects), ["Service default/db", "Service default/web"]);

        // A removed file removes its objects.
        std::fs::remove_file(dir.path().join("db.yaml")).unwrap();
        let [Event::Snapshot { objects, .. }] = &watcher.poll()[..] else {
            panic!("no snapshot after removal")
        };
        assert_eq!(names(objects), ["Service default/web"]);
    }

    #[test]
    fn a_file_that_never_parsed_adds_nothing_and_holds_nothing_back() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.json"), "{\"kind\": \"List\", \"items\": [").unwrap();
        std::fs::write(dir.path().join("b.yaml"), SERVICE).unwrap();
        let mut watcher = DirWatcher::new(dir.path().to_path_buf());
        let [Event::Snapshot { objects, .. }, Event::Error(error)] = &watcher.poll()[..] else {
            panic!("no snapshot and error")
        };
        assert_eq!(names(objects), ["Service default/web"]);
        assert!(error.to_string().contains("a.json"), "{error}");
    }

    #[test]
    fn an_object_defined_twice_keeps_the_running_one() {
        let dir = tempfile::tempdir().unwrap();
        let port = |p: &str| SERVICE.replace("port: 80", &format!("port: {p}"));
        std::fs::write(dir.path().join("m.yaml"), port("81")).unwrap();
        let mut watcher = DirWatcher::new(dir.path().to_path_buf());
        let [Event::Snapshot { objects: first, .. }] = &watcher.poll()[..] else {
            panic!("no first snapshot")
        };
        // A file sorting before m.yaml defines default/web again: refused, m.yaml's stays.
        std::fs::write(dir.path().join("a.yaml"), port("82")).unwrap();
        let [Event::Snapshot { objects, .. }] = &watcher.poll()[..] else {
            panic!("no snapshot")
        };
        assert_eq!(objects, first, "the running Service was replaced");
        // And one sorting after it too.
        std::fs::write(dir.path().join("z.yaml"), port("83")).unwrap();
        let [Event::Snapshot { objects, .. }] = &watcher.poll()[..] else {
            panic!("no snapshot")
        };
        assert_eq!(objects, first, "the running Service was replaced");
        // Once the running one's file goes, the first of the others in name order is used.
        std::fs::remove_file(dir.path().join("m.yaml")).unwrap();
        let [Event::Snapshot { objects, .. }] = &watcher.poll()[..] else {
            panic!("no snapshot")
        };
        let from_a = parse_file(Path::new("a.yaml"), &port("82")).unwrap();
        assert_eq!(*objects, from_a);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let errors = read_dir(&dir.path().join("nope")).unwrap_err();
        assert!(
            errors[0]
                .to_string()
                .contains("cannot read the manifests directory"),
            "{}",
            errors[0]
        );
    }
}
