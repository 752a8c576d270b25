//! Loam's Groups service on the agent endpoint: this node's part of a group
//! snapshot cut across nodes, stepped by the controller
//! ([`crate::routing::groups`]), and the calls that read, settle and remove
//! a part. The steps and what an early end undoes are the driver's
//! ([`crate::driver::HeldPart`]); here they are read off the stream, each on
//! a blocking thread, with a bound on how long the controller may take
//! between two of them while this node holds filesystems frozen.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::api::cut_progress::Progress;
use crate::api::cut_step::Step;
use crate::api::groups_server::Groups;
use crate::api::member_hold::Hold as WireHold;
use crate::api::{
    AlreadyMade, Committed, CutDone, CutProgress, CutStep, DeletePartResponse, GroupPart, GroupPartRequest, MemberHold,
    PrepareStep, Prepared as WirePrepared, Recorded,
};
use crate::driver::{Driver, GroupSnapshot, HeldPart, PartPlan, Prepared};
use crate::error::{Error, Result};
use crate::ids::{Kind, ObjectId, validate_name};
use crate::rpc::controller::snapshot_message;
use crate::rpc::{blocking, traced, validate};
use crate::write_order::Hold;

/// How long the controller may take to send the next step. Past it the part
/// ends as if the controller had gone: what is frozen here is thawed.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The Groups service of one node agent.
#[derive(Debug, Clone)]
pub struct GroupPartsService {
    driver: Arc<Driver>,
}

impl GroupPartsService {
    /// Serves `driver`'s parts of group snapshots.
    pub fn new(driver: Arc<Driver>) -> Self {
        GroupPartsService { driver }
    }
}

type ProgressSender = mpsc::Sender<std::result::Result<CutProgress, Status>>;

#[tonic::async_trait]
impl Groups for GroupPartsService {
    type CutStream = ReceiverStream<std::result::Result<CutProgress, Status>>;

    async fn cut(&self, request: Request<Streaming<CutStep>>) -> Result<Response<Self::CutStream>, Status> {
        let mut steps = request.into_inner();
        let (progress, answers) = mpsc::channel(1);
        let driver = self.driver.clone();
        // The session runs to its end whatever happens to the call, so an
        // early end always thaws and undoes.
        tokio::spawn(async move {
            let first = match next_step(&mut steps).await {
                Ok(Step::Prepare(prepare)) => prepare,
                Ok(_) => {
                    return refuse(&progress, Error::InvalidArgument("a cut starts with prepare".into()).into()).await;
                }
                Err(e) => return refuse(&progress, e.into()).await,
            };
            let name = first.name.clone();
            let session = session(driver, first, &mut steps, &progress);
            if let Err(status) = traced("GroupCut", &name, session).await {
                refuse(&progress, status).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(answers)))
    }

    async fn get_part(&self, request: Request<GroupPartRequest>) -> Result<Response<GroupPart>, Status> {
        let id = request.into_inner().group_snapshot_id;
        let driver = self.driver.clone();
        traced("GetPart", &id.clone(), async move {
            let id = group_id(&id)?;
            Ok(part_message(&driver.group_part(&id)?))
        })
        .await
    }

    async fn settle_part(&self, request: Request<GroupPartRequest>) -> Result<Response<GroupPart>, Status> {
        let id = request.into_inner().group_snapshot_id;
        let driver = self.driver.clone();
        traced("SettlePart", &id.clone(), async move {
            let id = group_id(&id)?;
            Ok(part_message(&blocking(move || driver.settle_part(&id)).await?))
        })
        .await
    }

    async fn delete_part(&self, request: Request<GroupPartRequest>) -> Result<Response<DeletePartResponse>, Status> {
        let id = request.into_inner().group_snapshot_id;
        let driver = self.driver.clone();
        traced("DeletePart", &id.clone(), async move {
            let id = group_id(&id)?;
            blocking(move || driver.delete_part(&id)).await?;
            Ok(DeletePartResponse {})
        })
        .await
    }
}

/// One session: prepare, then each step as it comes; any early end (an
/// error, the controller gone, a step late) ends the part, which thaws and
/// undoes what it must.
async fn session(
    driver: Arc<Driver>,
    prepare: PrepareStep,
    steps: &mut Streaming<CutStep>,
    progress: &ProgressSender,
) -> Result<()> {
    let plan = plan(prepare)?;
    let part = match blocking(move || HeldPart::prepare(driver, plan)).await? {
        Prepared::Made => return send(progress, Progress::Made(AlreadyMade {})).await,
        Prepared::Held(part) => *part,
    };
    let members = part.holds().into_iter().map(|(volume_id, hold)| member_hold(volume_id, hold)).collect();
    let mut part = Some(part);
    let outcome = async {
        send(progress, Progress::Prepared(WirePrepared { members })).await?;
        expect(steps, "cut", |s| matches!(s, Step::Cut(_))).await?;
        on_part(&mut part, HeldPart::cut).await?;
        send(progress, Progress::Cut(CutDone {})).await?;
        expect(steps, "record", |s| matches!(s, Step::Record(_))).await?;
        let recorded = on_part(&mut part, HeldPart::record).await?;
        let snapshots = recorded.iter().map(|s| snapshot_message(s)).collect();
        send(progress, Progress::Recorded(Recorded { snapshots })).await?;
        expect(steps, "commit", |s| matches!(s, Step::Commit(_))).await?;
        on_part(&mut part, HeldPart::commit).await?;
        send(progress, Progress::Committed(Committed {})).await
    }
    .await;
    if let Some(part) = part {
        tokio::task::spawn_blocking(move || part.end())
            .await
            .map_err(|e| Error::io("ending a group snapshot part", std::io::Error::other(e.to_string())))?;
    }
    outcome
}

/// Runs one step of the part on a blocking thread. The part goes along and
/// comes back; if the thread panics it is dropped there, which thaws it.
async fn on_part<T: Send + 'static>(part: &mut Option<HeldPart>, step: fn(&mut HeldPart) -> Result<T>) -> Result<T> {
    let mut held = part.take().ok_or_else(|| Error::Aborted("an earlier step of this cut failed".into()))?;
    let (held, answer) = tokio::task::spawn_blocking(move || {
        let answer = step(&mut held);
        (held, answer)
    })
    .await
    .map_err(|e| Error::io("a group snapshot step", std::io::Error::other(e.to_string())))?;
    *part = Some(held);
    answer
}

/// The prepare step as the driver takes it, validated as
/// CreateVolumeGroupSnapshot validates its request.
fn plan(prepare: PrepareStep) -> Result<PartPlan> {
    validate_name("group snapshot", &prepare.name)?;
    let sources = validate::source_volume_ids(&prepare.source_volume_ids)?;
    validate::group_snapshot_parameters(&prepare.parameters)?;
    let group = group_id(&prepare.group_snapshot_id)?;
    if group.key != crate::ids::Key::for_name(Kind::GroupSnapshot, &prepare.name) {
        return Err(Error::InvalidArgument(format!("group snapshot id {group} is not the one named {}", prepare.name)));
    }
    Ok(PartPlan { group, name: prepare.name, sources })
}

fn group_id(id: &str) -> Result<ObjectId> {
    validate::required_id("group snapshot id", id)?;
    ObjectId::parse(id)
        .ok_or_else(|| Error::NotFound(format!("group snapshot {id} does not exist (not an id Loam made)")))
}

/// Waits for the next step: the controller's end of the stream, an error
/// on it, or a step later than [`STEP_TIMEOUT`] is an early end.
async fn next_step(steps: &mut Streaming<CutStep>) -> Result<Step> {
    match tokio::time::timeout(STEP_TIMEOUT, steps.message()).await {
        Ok(Ok(Some(CutStep { step: Some(step) }))) => Ok(step),
        Ok(Ok(Some(CutStep { step: None }))) => Err(Error::InvalidArgument("a cut step names no step".into())),
        Ok(Ok(None)) => Err(Error::Aborted("the controller ended the cut before it was complete".into())),
        Ok(Err(status)) => Err(Error::Aborted(format!("the controller's stream broke: {}", status.message()))),
        Err(_) => Err(Error::DeadlineExceeded(format!(
            "the controller sent no next step within {STEP_TIMEOUT:?}; the cut is abandoned and its volumes thawed"
        ))),
    }
}

async fn expect(steps: &mut Streaming<CutStep>, name: &str, fits: fn(&Step) -> bool) -> Result<()> {
    let step = next_step(steps).await?;
    if fits(&step) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!("the cut's next step is {name}, not {step:?}")))
}

async fn send(progress: &ProgressSender, step: Progress) -> Result<()> {
    progress
        .send(Ok(CutProgress { progress: Some(step) }))
        .await
        .map_err(|_| Error::Aborted("the controller went away during the cut".into()))
}

async fn refuse(progress: &ProgressSender, status: Status) {
    // Nobody to tell when the controller has gone.
    let _ = progress.send(Err(status)).await;
}

fn member_hold(volume_id: String, hold: Hold) -> MemberHold {
    let hold = match hold {
        Hold::Quiet => WireHold::Quiet,
        Hold::Frozen => WireHold::Frozen,
        Hold::Live => WireHold::Live,
        Hold::Copied => WireHold::Copied,
    };
    MemberHold { volume_id, hold: hold as i32 }
}

fn part_message(part: &GroupSnapshot) -> GroupPart {
    GroupPart {
        snapshot_ids: part.record.snapshot_ids.clone(),
        snapshots: part.members.iter().map(|s| snapshot_message(s)).collect(),
        complete: part.record.complete,
        created_secs: part.record.created_secs,
        created_nanos: part.record.created_nanos,
    }
}
