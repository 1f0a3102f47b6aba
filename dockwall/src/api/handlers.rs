//! The endpoints. Reads load the stored rule set and the kernel's counters; changes are one
//! `firewall::edit` each. Both block (file lock, nft), so they run on blocking threads.

use axum::extract::rejection::{FormRejection, JsonRejection};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Form, Json};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use vnf_core::firewall::nft::{self, Counters};
use vnf_core::firewall::{self, compile, Action, Direction, NatRule, Rule, RuleSet};
use vnf_core::Error;

use super::auth::{self, Caller, CSRF_HEADER, SESSION_COOKIE};
use super::resources::{
    DefaultPolicyBody, FirewallRuleBody, FirewallRuleView, InsertRule, NatRuleBody, RemoveRule,
};
use super::{ApiError, AppState};
use crate::commands::routing_report;
use crate::metrics::count_edit;

type Reply = Result<Response, ApiError>;

const PAGE: &str = include_str!("page.html");
pub const LOGIN_PAGE: &str = include_str!("login.html");

/// The body as JSON, or 400 (413 when too large) in Neutron's error shape.
fn body<T: DeserializeOwned>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(|rejection| {
        // Neutron answers 400 to a body it cannot use, where axum says 422.
        let (status, kind) = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge")
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UnsupportedMediaType")
            }
            _ => (StatusCode::BAD_REQUEST, "BadRequest"),
        };
        ApiError::new(status, kind, rejection.body_text())
    })
}

/// Runs blocking work (file lock, nft) off the async executor.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            format!("the request's worker failed: {error}"),
        )
    })?
}

/// The stored rule set.
async fn load(state: &AppState) -> Result<RuleSet, ApiError> {
    let state = state.clone();
    blocking(move || Ok(state.store.lock()?.load()?)).await
}

/// The stored rule set and the kernel's counters.
async fn snapshot(state: &AppState) -> Result<(RuleSet, Counters), ApiError> {
    let state = state.clone();
    blocking(move || {
        let rule_set = state.store.lock()?.load()?;
        Ok((rule_set, nft::rule_counters()?))
    })
    .await
}

/// One edit through the same store, lock and atomic apply as the CLI. `change` returns what
/// the response needs; its ApiError (a 404, say) aborts the edit with nothing changed.
async fn edit<T: Send + 'static>(
    state: &AppState,
    change: impl FnOnce(&mut RuleSet) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    let assignment = firewall::current_assignment(&state.config.selectors).await;
    blocking(move || {
        let mut result = None;
        // A poisoned lock only means an earlier edit panicked; its cache is checked anyway.
        let mut session = state
            .edits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let outcome = assignment.and_then(|assignment| {
            session.edit(&state.store, &assignment, false, |set| {
                let value = change(set);
                let failed = value.is_err();
                result = Some(value);
                if failed {
                    return Err(Error::Vnf("aborted by the API request".into()));
                }
                Ok(())
            })
        });
        count_edit(&state.store, outcome.is_ok());
        match (outcome, result) {
            (_, Some(Err(error))) => Err(error),
            (Err(error), _) => Err(error.into()),
            (Ok(_), Some(Ok(value))) => Ok(value),
            (Ok(_), None) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "the edit did not run",
            )),
        }
    })
    .await
}

fn rule_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::not_found("firewall rule", id))
}

fn rule_index(set: &RuleSet, id: &str) -> Result<usize, ApiError> {
    set.position_of(rule_id(id)?)
        .ok_or_else(|| ApiError::not_found("firewall rule", id))
}

fn view(set: &RuleSet, index: usize, counters: &Counters) -> FirewallRuleView {
    let rule = &set.rules[index];
    let counted = nft::counted(counters, &compile::rule_comment(rule.id));
    FirewallRuleView::new(rule, index + 1, counted)
}

fn views(set: &RuleSet, counters: &Counters) -> Vec<FirewallRuleView> {
    (0..set.rules.len())
        .map(|index| view(set, index, counters))
        .collect()
}

fn reply(status: StatusCode, value: Value) -> Reply {
    Ok((status, Json(value)).into_response())
}

pub async fn list_rules(State(state): State<AppState>) -> Reply {
    let (set, counters) = snapshot(&state).await?;
    reply(
        StatusCode::OK,
        json!({ "firewall_rules": views(&set, &counters) }),
    )
}

pub async fn show_rule(State(state): State<AppState>, Path(id): Path<String>) -> Reply {
    let (set, counters) = snapshot(&state).await?;
    let index = rule_index(&set, &id)?;
    reply(
        StatusCode::OK,
        json!({ "firewall_rule": view(&set, index, &counters) }),
    )
}

pub async fn create_rule(
    State(state): State<AppState>,
    request: Result<Json<FirewallRuleBody>, JsonRejection>,
) -> Reply {
    let mut fields = body(request)?.firewall_rule;
    // Neutron's default.
    let action = fields.action.unwrap_or(Action::Deny);
    let position = fields.position.take();
    let created = edit(&state, move |set| {
        let last = set.rules.len() + 1;
        let position = position.unwrap_or(last);
        if position == 0 || position > last {
            return Err(Error::invalid("position", position, format!("use 1-{last}")).into());
        }
        let id = set.allocate_id();
        let mut rule = Rule::new(id, action, Direction::Both);
        fields.apply_to(&mut rule)?;
        rule.validate_as(&format!("the new rule (position {position}, id {id})"))?;
        set.rules.insert(position - 1, rule);
        Ok(FirewallRuleView::new(
            &set.rules[position - 1],
            position,
            (0, 0),
        ))
    })
    .await?;
    reply(StatusCode::CREATED, json!({ "firewall_rule": created }))
}

pub async fn update_rule(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: Result<Json<FirewallRuleBody>, JsonRejection>,
) -> Reply {
    let fields = body(request)?.firewall_rule;
    if fields.position.is_some() {
        return Err(Error::invalid(
            "position",
            "given",
            "move a rule with the policy's insert_rule",
        )
        .into());
    }
    let (rule, index) = edit(&state, move |set| {
        let index = rule_index(set, &id)?;
        fields.apply_to(&mut set.rules[index])?;
        set.rules[index].validate()?;
        Ok((set.rules[index].clone(), index))
    })
    .await?;
    let counters = blocking(|| Ok(nft::rule_counters()?)).await?;
    let counted = nft::counted(&counters, &compile::rule_comment(rule.id));
    let updated = FirewallRuleView::new(&rule, index + 1, counted);
    reply(StatusCode::OK, json!({ "firewall_rule": updated }))
}

pub async fn delete_rule(State(state): State<AppState>, Path(id): Path<String>) -> Reply {
    edit(&state, move |set| {
        let index = rule_index(set, &id)?;
        set.rules.remove(index);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A policy id: a direction, or FWaaS's ingress (into the left side) and egress.
fn policy_direction(id: &str) -> Result<Direction, ApiError> {
    match id {
        "ingress" => Ok(Direction::RightToLeft),
        "egress" => Ok(Direction::LeftToRight),
        other => serde_json::from_value(Value::String(other.to_string()))
            .map_err(|_| ApiError::not_found("firewall policy", id)),
    }
}

fn policy(set: &RuleSet, direction: Direction) -> Value {
    let rules: Vec<String> = set
        .rules
        .iter()
        .filter(|rule| rule.direction == direction)
        .map(|rule| rule.id.to_string())
        .collect();
    json!({
        "id": direction,
        "name": direction,
        "description": "the rules of this direction, in evaluation order",
        "firewall_rules": rules,
        "audited": false,
        "shared": false,
    })
}

const DIRECTIONS: [Direction; 4] = [
    Direction::LeftToRight,
    Direction::RightToLeft,
    Direction::Both,
    Direction::Local,
];

pub async fn list_policies(State(state): State<AppState>) -> Reply {
    let set = load(&state).await?;
    let policies: Vec<Value> = DIRECTIONS.iter().map(|&d| policy(&set, d)).collect();
    reply(StatusCode::OK, json!({ "firewall_policies": policies }))
}

pub async fn show_policy(State(state): State<AppState>, Path(id): Path<String>) -> Reply {
    let direction = policy_direction(&id)?;
    let set = load(&state).await?;
    reply(
        StatusCode::OK,
        json!({ "firewall_policy": policy(&set, direction) }),
    )
}

/// Moves a rule into this direction's policy: before or after a rule of that policy, or first
/// when neither is given (as FWaaS does).
pub async fn insert_rule(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: Result<Json<InsertRule>, JsonRejection>,
) -> Reply {
    let direction = policy_direction(&id)?;
    let request = body(request)?;
    let updated = edit(&state, move |set| {
        let index = rule_index(set, &request.firewall_rule_id)?;
        let mut rule = set.rules.remove(index);
        rule.direction = direction;
        let in_policy = |set: &RuleSet, field: &str, reference: &str| {
            let at = rule_index(set, reference)?;
            if set.rules[at].direction != direction {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "FirewallRuleNotInPolicy",
                    format!(
                        "{field} {reference:?} is a rule of the policy {}, not of {id:?}: \
                         name a rule of {id:?}, or leave {field} out",
                        json!(set.rules[at].direction)
                    ),
                ));
            }
            Ok(at)
        };
        let target = match (&request.insert_before, &request.insert_after) {
            (Some(before), _) if !before.is_empty() => in_policy(set, "insert_before", before)?,
            (_, Some(after)) if !after.is_empty() => in_policy(set, "insert_after", after)? + 1,
            _ => 0,
        };
        set.rules.insert(target, rule);
        Ok(policy(set, direction))
    })
    .await?;
    reply(StatusCode::OK, updated)
}

/// Dockwall keeps no rule outside a policy, so unlike Neutron it cannot take a rule out of
/// one and keep it: this changes nothing and says what to do instead.
pub async fn remove_rule(
    State(state): State<AppState>,
    Path(id): Path<String>,
    request: Result<Json<RemoveRule>, JsonRejection>,
) -> Reply {
    let direction = policy_direction(&id)?;
    let request = body(request)?;
    let set = load(&state).await?;
    let index = rule_index(&set, &request.firewall_rule_id)?;
    if set.rules[index].direction != direction {
        return Err(ApiError::not_found(
            "firewall rule in this policy",
            &request.firewall_rule_id,
        ));
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "FirewallRuleInUse",
        format!(
            "Dockwall keeps no rule outside a policy: DELETE /v2.0/fwaas/firewall_rules/{0} \
             to delete it, or PUT /v2.0/fwaas/firewall_policies/POLICY/insert_rule with \
             {{\"firewall_rule_id\": \"{0}\"}} to move it into another policy",
            request.firewall_rule_id
        ),
    ))
}

fn nat_view(nat: &NatRule, position: usize, counters: &Counters) -> Value {
    let (packets, bytes) = nft::counted(counters, &compile::nat_comment(nat.id));
    json!({
        "id": nat.id.to_string(), "position": position, "kind": nat.kind,
        "comment": nat.comment, "packets": packets, "bytes": bytes,
    })
}

fn nat_index(set: &RuleSet, id: &str) -> Result<usize, ApiError> {
    id.parse::<u64>()
        .ok()
        .and_then(|id| set.nat.iter().position(|nat| nat.id == id))
        .ok_or_else(|| ApiError::not_found("NAT rule", id))
}

pub async fn list_nat(State(state): State<AppState>) -> Reply {
    let (set, counters) = snapshot(&state).await?;
    let listed: Vec<Value> = (set.nat.iter().enumerate())
        .map(|(index, nat)| nat_view(nat, index + 1, &counters))
        .collect();
    reply(StatusCode::OK, json!({ "nat_rules": listed }))
}

pub async fn show_nat(State(state): State<AppState>, Path(id): Path<String>) -> Reply {
    let (set, counters) = snapshot(&state).await?;
    let index = nat_index(&set, &id)?;
    reply(
        StatusCode::OK,
        json!({ "nat_rule": nat_view(&set.nat[index], index + 1, &counters) }),
    )
}

pub async fn create_nat(
    State(state): State<AppState>,
    request: Result<Json<NatRuleBody>, JsonRejection>,
) -> Reply {
    let fields = body(request)?.nat_rule;
    let created = edit(&state, move |set| {
        let id = set.allocate_id();
        let position = set.nat.len() + 1;
        let nat = NatRule {
            id,
            kind: fields.kind,
            comment: fields.comment,
        };
        nat.validate_as(&format!("the new NAT rule (position {position}, id {id})"))?;
        let shown = nat_view(&nat, position, &Counters::new());
        set.nat.push(nat);
        Ok(shown)
    })
    .await?;
    reply(StatusCode::CREATED, json!({ "nat_rule": created }))
}

pub async fn delete_nat(State(state): State<AppState>, Path(id): Path<String>) -> Reply {
    edit(&state, move |set| {
        let index = nat_index(set, &id)?;
        set.nat.remove(index);
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn show_default(State(state): State<AppState>) -> Reply {
    let set = load(&state).await?;
    reply(StatusCode::OK, defaults(&set))
}

/// The default policy and what each forwarded direction gets (an FWaaS import or a
/// `direction` sets them apart).
fn defaults(set: &RuleSet) -> Value {
    json!({
        "default_policy": set.default_policy,
        "left_to_right_policy": set.policy_for(Direction::LeftToRight),
        "right_to_left_policy": set.policy_for(Direction::RightToLeft),
    })
}

pub async fn set_default(
    State(state): State<AppState>,
    request: Result<Json<DefaultPolicyBody>, JsonRejection>,
) -> Reply {
    let DefaultPolicyBody {
        default_policy: policy,
        direction,
    } = body(request)?;
    let updated = edit(&state, move |set| {
        set.set_default_policy(policy, direction)?;
        Ok(defaults(set))
    })
    .await?;
    reply(StatusCode::OK, updated)
}

/// The sides, routing (or the bridge in transparent mode), and the firewall with counters:
/// what `dockwall status --json` gathers, in the API's shape.
pub async fn status(State(state): State<AppState>) -> Reply {
    let set = load(&state).await?;
    let routing = routing_report(&state.config, set.mode).await?;
    let assignment = firewall::current_assignment(&state.config.selectors).await?;
    // One listing of the tables for both the check and the counters, as `dockwall status`.
    let (set, counters, converged) = blocking(move || {
        let listings = firewall::Listings::read()?;
        let converged = firewall::differences_in(&listings, &set, &assignment)?.is_empty();
        Ok((set, listings.counters()?, converged))
    })
    .await?;
    let nat: Vec<Value> = (set.nat.iter().enumerate())
        .map(|(index, nat)| nat_view(nat, index + 1, &counters))
        .collect();
    reply(
        StatusCode::OK,
        json!({
            "healthy": routing.converged && converged,
            "routing": routing.json,
            "firewall": {
                "converged": converged,
                "defaults": defaults(&set),
                "firewall_rules": views(&set, &counters),
                "nat_rules": nat,
            }
        }),
    )
}

/// The web page, with this browser session's CSRF token for its changes.
pub async fn page(State(state): State<AppState>, headers: HeaderMap) -> Reply {
    let csrf = match auth::caller(&state, &headers) {
        Some(Caller::Session { csrf }) => csrf,
        _ => String::new(),
    };
    Ok(Html(
        PAGE.replace("{{csrf}}", &csrf)
            .replace("{{csrf_header}}", CSRF_HEADER),
    )
    .into_response())
}

/// The login form (`GET /login`).
pub async fn login_form() -> Response {
    Html(LOGIN_PAGE.replace("{{error}}", "")).into_response()
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

/// `POST /login` with the form's `token`: a new browser session and back to the page. The
/// token travels in the body only, never in a URL that logs, history or a Referer keep.
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Reply {
    if !auth::same_origin(&headers, state.https) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "CrossOriginLogin",
            "log in from Dockwall's own login form (Origin or Sec-Fetch-Site names another site)",
        ));
    }
    let wrong = |message: &str| {
        let page = LOGIN_PAGE.replace("{{error}}", &format!("<p class=error>{message}</p>"));
        Ok((StatusCode::UNAUTHORIZED, Html(page)).into_response())
    };
    let Ok(Form(form)) = form else {
        return wrong("Send the token as the form field token.");
    };
    let token = state.token.get();
    if !auth::equal(form.token.trim(), &token) {
        return wrong("Wrong token.");
    }
    let session = state.sessions.open(&token);
    let secure = if state.https { "; Secure" } else { "" };
    let cookie = format!(
        "{SESSION_COOKIE}={session}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{secure}",
        auth::SESSION_LIFETIME.as_secs()
    );
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response())
}

/// `POST /logout` (a session change, so with its CSRF token): ends the browser session.
pub async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(session) = auth::cookies(&headers).get(SESSION_COOKIE) {
        state.sessions.close(session);
    }
    let expired = format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict");
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, expired)]).into_response()
}
