// The console's pages. Each has `load(...args)` (the API reads it needs) and
// `view(data, ...args)` (the elements it shows); `needsKey` pages read what only
// the cluster's identities may see.

import { ApiError, api, badge, h, link, refresh, session, table, when } from "./ui.js";
import { pretty, proposalDigest, signDecision } from "./sign.js";

const enc = encodeURIComponent;

function mib(n) {
  const v = Number(n);
  return v >= 1024 ? `${(v / 1024).toFixed(v % 1024 ? 1 : 0)} GiB` : `${v} MiB`;
}

function bytes(n) {
  const v = Number(n);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let x = v;
  while (x >= 1024 && i < units.length - 1) {
    x /= 1024;
    i++;
  }
  return `${i ? x.toFixed(1) : x} ${units[i]}`;
}

function cpu(millis) {
  return `${(Number(millis) / 1000).toFixed(Number(millis) % 1000 ? 1 : 0)} cores`;
}

function allocationRows(allocs, { node = true } = {}) {
  return allocs.map((a) => [
    link(`#/allocation/${enc(a.id)}`, String(a.id).slice(0, 8)),
    `${a.group}[${a.index}]`,
    node ? link(`#/nodes/${enc(a.node_id)}`, a.node_id) : `v${a.job_version}`,
    badge(a.state),
    a.canary ? "canary" : "",
    a.gpus.length ? a.gpus.length : "-",
    a.endpoint || "-",
    a.restarts,
    a.reason || "",
  ]);
}

const ALLOC_HEAD = ["allocation", "instance", "node", "state", "", "GPUs", "endpoint", "restarts", "reason"];

// ---- cluster ---------------------------------------------------------------------

const cluster = {
  async load() {
    const [status, ready] = await Promise.all([
      api("GET", "/api/v1/cluster"),
      api("GET", "/ready").catch((e) => ({ status: `not ready (${e.message})` })),
    ]);
    return { status, ready };
  },
  view({ status, ready }) {
    return h(
      "section",
      {},
      h("h1", {}, "Cluster"),
      h("dl", { class: "facts" },
        h("dt", {}, "leader"), h("dd", { id: "leader" }, status.leader ?? "none (no quorum)"),
        h("dt", {}, "term"), h("dd", {}, status.term),
        h("dt", {}, "committed"), h("dd", {}, status.commit_index),
        h("dt", {}, "applied"), h("dd", {}, status.applied_index),
        h("dt", {}, "this server"), h("dd", {}, `${status.id}: ${ready.status}`)),
      h("h2", {}, "Members"),
      table(["id", "address", "role", ""],
        status.members.map((m) => [m.id, m.addr, m.role, m.is_leader ? badge("leader") : ""])),
    );
  },
};

// ---- nodes -----------------------------------------------------------------------

function gpuRows(node) {
  const seen = new Map(((node.telemetry && node.telemetry.gpus) || []).map((g) => [g.uuid, g]));
  return node.resources.gpus.map((g) => {
    const t = seen.get(g.uuid) || {};
    return [
      g.index,
      g.model,
      mib(g.memory_mib),
      t.memory_used_mib === undefined ? "-" : mib(t.memory_used_mib),
      t.utilization_percent === undefined ? "-" : `${t.utilization_percent}%`,
      t.temperature_c === undefined ? "-" : `${t.temperature_c} °C`,
      g.healthy ? badge("healthy") : h("span", {}, badge("unhealthy"), " ", g.health_reason || ""),
    ];
  });
}

const nodes = {
  needsKey: true,
  async load(id) {
    if (id) {
      const [node, allocs] = await Promise.all([
        api("GET", `/api/v1/nodes/${enc(id)}`),
        api("GET", `/api/v1/nodes/${enc(id)}/allocations`),
      ]);
      return { node, allocs };
    }
    return { list: await api("GET", "/api/v1/nodes") };
  },
  view(data, id) {
    if (id) {
      const n = data.node;
      return h(
        "section",
        {},
        h("h1", {}, "Node ", n.name || n.id),
        h("dl", { class: "facts" },
          h("dt", {}, "status"), h("dd", {}, badge(n.status), n.revoked ? " revoked" : "",
            n.drain ? " draining" : ""),
          h("dt", {}, "address"), h("dd", {}, n.address || "-"),
          h("dt", {}, "data port"), h("dd", {}, n.data_port ? `${n.data_port}${n.data_tls ? " (TLS)" : ""}` : "-"),
          h("dt", {}, "CPU"), h("dd", {}, cpu(n.resources.cpu_millis)),
          h("dt", {}, "memory"), h("dd", {}, mib(n.resources.memory_mib)),
          h("dt", {}, "last seen"), h("dd", {}, when(n.last_seen)),
          h("dt", {}, "attributes"), h("dd", {}, Object.entries(n.attributes).map(([k, v]) => `${k}=${v}`).join(", ") || "-")),
        h("h2", {}, "GPUs"),
        table(["#", "model", "memory", "used", "utilization", "temperature", "health"], gpuRows(n), "no GPUs"),
        h("h2", {}, "Running here"),
        table(ALLOC_HEAD, allocationRows(data.allocs.filter((a) => !["complete", "failed", "lost", "stopped"].includes(a.state))),
          "nothing runs here"),
      );
    }
    return h(
      "section",
      {},
      h("h1", {}, "Nodes"),
      table(
        ["node", "status", "site", "GPUs", "CPU used", "memory used", "allocations", "last seen"],
        data.list.map((n) => [
          link(`#/nodes/${enc(n.id)}`, n.name || n.id),
          h("span", {}, badge(n.revoked ? "revoked" : n.status), n.drain ? " draining" : ""),
          n.attributes.site || "-",
          n.resources.gpus.length
            ? `${n.resources.gpus.length}× ${n.resources.gpus[0].model}` +
              (n.resources.gpus.some((g) => !g.healthy) ? " (unhealthy)" : "")
            : "-",
          n.usage ? `${cpu(n.usage.cpu_millis)} of ${cpu(n.resources.cpu_millis)}` : "-",
          n.usage ? `${mib(n.usage.memory_mib)} of ${mib(n.resources.memory_mib)}` : "-",
          n.usage ? n.usage.allocations : 0,
          when(n.last_seen),
        ]),
        "no nodes have joined",
      ),
    );
  },
};

// ---- jobs, deployments, allocations ---------------------------------------------

async function deploymentAction(job, action) {
  try {
    const answer = await api("POST", `/api/v1/jobs/${enc(job)}/deployment/${action}`);
    if (answer && answer.proposal) location.hash = `#/proposals/${enc(answer.proposal)}`;
  } catch (e) {
    document.getElementById("status").textContent = `${action}: ${e.status} ${e.code}: ${e.message}`;
  }
  await refresh();
}

// A job's scaled groups (count within min..max, the targets) and the latest
// changes of count with their reasons, newest first; nothing for a job without
// a scaling block.
function scalingView(j) {
  const scaled = j.spec.groups.filter((g) => g.scaling);
  if (!scaled.length) return [];
  const targets = (s) =>
    [s.target_concurrency && `${s.target_concurrency} in flight`, s.target_tokens_per_second && `${s.target_tokens_per_second} tokens/s`]
      .filter(Boolean)
      .join(" or ");
  const events = (j.scale_events || []).slice().reverse();
  return [
    h("h2", {}, "Scaling"),
    table(
      ["group", "count", "between", "per replica", "idle to zero"],
      scaled.map((g) => [g.name, g.count, `${g.scaling.min}..${g.scaling.max}`, targets(g.scaling), g.scaling.min === 0 ? g.scaling.idle_to_zero || g.scaling.scale_down_window : "never"]),
    ),
    h("h3", {}, "Changes of count"),
    table(["when", "group", "from", "to", "why"], events.map((e) => [when(e.at), e.group, e.from, e.to, e.reason]), "no change yet"),
  ];
}

function deploymentView(job, d) {
  if (!d) return h("p", { class: "empty" }, "no rollout");
  const actions = {
    running: ["pause", "abort"],
    paused: ["resume", "abort"],
    awaiting_promotion: ["promote", "pause", "abort"],
  }[d.state] || [];
  return h(
    "div",
    { id: "deployment" },
    h("dl", { class: "facts" },
      h("dt", {}, "version"), h("dd", {}, d.version, d.stable_version ? ` (stable ${d.stable_version})` : ""),
      h("dt", {}, "state"), h("dd", {}, badge(d.state), " ", d.description),
      h("dt", {}, "healthy"), h("dd", {}, `${d.healthy} of ${d.desired} (${d.unhealthy} unhealthy, ${d.placed} placed)`),
      h("dt", {}, "deadline"), h("dd", {}, when(d.progress_deadline_at))),
    actions.map((a) => h("button", { class: "action", onclick: () => deploymentAction(job, a) }, a)),
  );
}

const jobs = {
  needsKey: true,
  async load(id) {
    if (id) {
      const [job, versions] = await Promise.all([
        api("GET", `/api/v1/jobs/${enc(id)}`),
        api("GET", `/api/v1/jobs/${enc(id)}/versions`).catch(() => []),
      ]);
      return { job, versions };
    }
    return { list: await api("GET", "/api/v1/jobs") };
  },
  view(data, id) {
    if (id) {
      const j = data.job;
      return h(
        "section",
        {},
        h("h1", {}, "Job ", j.name),
        h("dl", { class: "facts" },
          h("dt", {}, "status"), h("dd", {}, badge(j.status)),
          h("dt", {}, "version"), h("dd", {}, j.version),
          h("dt", {}, "circle"), h("dd", {}, j.spec.circle || "-"),
          h("dt", {}, "submitted"), h("dd", {}, when(j.submitted_at))),
        h("h2", {}, "Rollout"),
        deploymentView(j.name, j.deployment),
        scalingView(j),
        h("h2", {}, "Allocations"),
        table(ALLOC_HEAD, allocationRows(j.allocations), "none placed"),
        j.unplaced.length
          ? [h("h2", {}, "Not placed"), table(["group", "count", "why"], j.unplaced.map((u) => [u.group, u.count, u.reason]))]
          : [],
        h("h2", {}, "Versions"),
        table(["version", "submitted"], (Array.isArray(data.versions) ? data.versions : []).map((v) => [v.version, when(v.submitted_at)])),
      );
    }
    return h(
      "section",
      {},
      h("h1", {}, "Jobs"),
      table(
        ["job", "kind", "status", "version", "running", "updated"],
        data.list.map((j) => [
          link(`#/jobs/${enc(j.name)}`, j.name),
          j.kind,
          badge(j.status),
          j.version,
          `${j.running} of ${j.instances}`,
          when(j.updated_at),
        ]),
        "no jobs",
      ),
    );
  },
};

const allocation = {
  needsKey: true,
  async load(id) {
    return { logs: await api("GET", `/api/v1/allocations/${enc(id)}/logs`) };
  },
  view({ logs }, id) {
    return h(
      "section",
      {},
      h("h1", {}, "Allocation ", id),
      h("p", {}, "on ", link(`#/nodes/${enc(logs.node_id)}`, logs.node_id), `, logs as of ${when(logs.updated_at)}`),
      h("h2", {}, "stdout"),
      h("pre", { class: "log" }, logs.stdout || "(empty)"),
      h("h2", {}, "stderr"),
      h("pre", { class: "log" }, logs.stderr || "(empty)"),
    );
  },
};

// ---- models ----------------------------------------------------------------------

function shardHealth(m) {
  const health = m.health;
  if (!health) return badge("unchecked");
  const bad = Number(health.missing) + Number(health.corrupt);
  return h(
    "span",
    {},
    badge(bad === 0 ? "healthy" : Number(health.unrepairable) > 0 ? "failed" : "degraded"),
    ` ${health.healthy} of ${health.shards} shards`,
    bad ? ` (${health.missing} missing, ${health.corrupt} corrupt)` : "",
    ` checked ${when(health.checked_at)}`,
  );
}

const models = {
  needsKey: true,
  async load() {
    const [list, storage] = await Promise.all([
      api("GET", "/api/v1/models"),
      api("GET", "/api/v1/storage"),
    ]);
    return { list, storage };
  },
  view({ list, storage }) {
    return h(
      "section",
      {},
      h("h1", {}, "Models"),
      table(
        ["name", "digest", "circle", "size", "stored", "code", "shards", "registered"],
        list.map((m) => [
          m.name,
          h("code", { title: m.digest }, m.digest.slice(0, 16)),
          m.circle || "-",
          bytes(m.size),
          bytes(m.stored_bytes),
          `${m.k}+${m.m}`,
          shardHealth(m),
          when(m.created_at),
        ]),
        "no models",
      ),
      h("h2", {}, "Store"),
      storage.backends.length
        ? [
            h("p", {}, `default code ${storage.k}+${storage.m}`, storage.policy.length ? `; ${storage.policy.join("; ")}` : ""),
            table(["backend", "attributes"], storage.backends.map((b) => [b.name,
              Object.entries(b.attributes).map(([k, v]) => `${k}=${v}`).join(", ")])),
          ]
        : h("p", { class: "empty" }, "no store configured"),
    );
  },
};

// ---- circles ---------------------------------------------------------------------

// A circle's quota beside what it holds and borrows now, and its fair share.
function usageView(u) {
  const q = u.quota || {};
  const limit = (v) => (v === undefined || v === null ? "-" : String(v));
  const models = [...new Set([...Object.keys(u.used.gpus), ...Object.keys(q.gpus || {})])].sort();
  const rows = models.map((m) => [`GPUs ${m}`, limit((q.gpus || {})[m]), String(u.used.gpus[m] || 0),
    String(u.borrowed.gpus[m] || 0)]);
  rows.push(["GPU memory", limit(q.gpu_memory_mib && mib(q.gpu_memory_mib)), mib(u.used.gpu_memory_mib),
    mib(u.borrowed.gpu_memory_mib)]);
  rows.push(["CPU", limit(q.cpu_millis && cpu(q.cpu_millis)), cpu(u.used.cpu_millis), cpu(u.borrowed.cpu_millis)]);
  rows.push(["memory", limit(q.memory_mib && mib(q.memory_mib)), mib(u.used.memory_mib), mib(u.borrowed.memory_mib)]);
  return h(
    "div",
    { id: "circle-usage" },
    h("p", {}, `share ${u.share.toFixed(3)}`, u.quota ? "" : " (no quota)",
      `, ${u.pending} instance${u.pending === 1 ? "" : "s"} waiting`),
    table(["resource", "quota", "used", "borrowed"], rows),
  );
}

// A circle's balance, what it accrued and spends, and why its work is held.
function treasuryView(t) {
  if (!t.open) {
    return h("p", { class: "empty" }, "no treasury: use is metered, not charged, until a deposit");
  }
  return h(
    "div",
    { id: "circle-treasury" },
    table(["", "credits"], [
      ["balance", t.balance],
      ["accrued, settled next", t.accrued],
      ["available", t.available],
      ["rate per hour", t.rate_per_hour],
      ["spent in 24 h", t.spent_24h],
    ]),
    t.hold ? h("p", {}, badge("held"), " ", t.hold) : "",
  );
}

const circles = {
  needsKey: true,
  async load(name) {
    if (name) {
      const absent = (e) => (e instanceof ApiError && e.status === 404 ? null : Promise.reject(e));
      const [circle, governance, usage, treasury] = await Promise.all([
        api("GET", `/api/v1/circles/${enc(name)}`),
        api("GET", `/api/v1/circles/${enc(name)}/governance`).catch(absent),
        api("GET", `/api/v1/circles/${enc(name)}/usage`).catch(absent),
        api("GET", `/api/v1/treasury/${enc(name)}`).catch(absent),
      ]);
      return { circle, governance, usage, treasury };
    }
    return { list: await api("GET", "/api/v1/circles") };
  },
  view(data, name) {
    if (name) {
      const { circle, governance, usage, treasury } = data;
      return h(
        "section",
        {},
        h("h1", {}, "Circle ", circle.name),
        table(["member", "identity", "role"], circle.members.map((m) => [m.name, h("code", {}, m.identity), m.role])),
        h("h2", {}, "Quota and use"),
        usage ? usageView(usage) : h("p", { class: "empty" }, "nothing placed"),
        h("h2", {}, "Treasury"),
        treasury ? treasuryView(treasury) : h("p", { class: "empty" }, "no treasury"),
        h("h2", {}, "Governance"),
        governance ? h("pre", {}, JSON.stringify(governance, null, 2)) : h("p", { class: "empty" }, "not governed: changes apply as their role allows"),
        h("p", {}, link(`#/proposals?circle=${enc(circle.name)}`, "its proposals")),
      );
    }
    return h(
      "section",
      {},
      h("h1", {}, "Circles"),
      table(["circle", "members"], data.list.map((c) => [link(`#/circles/${enc(c.name)}`, c.name),
        c.members.map((m) => `${m.name} (${m.role})`).join(", ")]), "no circles"),
    );
  },
};

// ---- proposals -------------------------------------------------------------------

async function decide(p, digest, decision) {
  const message = document.getElementById("decision-message");
  try {
    const body = await signDecision(session.identity, digest, decision);
    const now = await api("POST", `/api/v1/proposals/${enc(p.id)}/approvals`, body);
    message.textContent = `${decision}: the proposal is ${now.state} (${now.approved_weight} of ${now.threshold})`;
    message.className = "";
  } catch (e) {
    message.textContent = `${decision} refused: ${e.status || ""} ${e.code || ""}: ${e.message}`;
    message.className = "failed";
    return;
  }
  await refresh();
}

const proposals = {
  needsKey: true,
  async load(id) {
    if (id) {
      const p = await api("GET", `/api/v1/proposals/${enc(id)}`, undefined, { exact: true });
      let digest = null;
      let mismatch = null;
      try {
        digest = await proposalDigest(p);
      } catch (e) {
        mismatch = e.message;
      }
      return { p, digest, mismatch };
    }
    const q = location.hash.split("?")[1];
    return { list: await api("GET", `/api/v1/proposals${q ? `?${q}` : ""}`) };
  },
  view(data, id) {
    if (id) return proposalView(data);
    return h(
      "section",
      {},
      h("h1", {}, "Proposals"),
      table(
        ["proposal", "state", "circle", "kind", "target", "approved", "created"],
        data.list.map((p) => [
          link(`#/proposals/${enc(p.id)}`, p.id),
          badge(p.state),
          p.circle,
          p.kind,
          p.target,
          `${p.approved_weight} of ${p.threshold}`,
          when(p.created_at),
        ]),
        "no proposals",
      ),
    );
  },
};

function proposalView({ p, digest, mismatch }) {
  const me = session.identity && p.signers.find((s) => s.identity === session.identity.id);
  const mine = session.identity && p.decisions.find((d) => d.identity === session.identity.id);
  const canDecide = p.state === "pending" && digest && !mismatch;
  return h(
    "section",
    {},
    h("h1", {}, "Proposal ", p.id),
    h("dl", { class: "facts" },
      h("dt", {}, "state"), h("dd", { id: "proposal-state" }, badge(p.state), p.reason ? ` ${p.reason}` : ""),
      h("dt", {}, "change"), h("dd", {}, `${p.kind} of ${p.target}`),
      h("dt", {}, "circle"), h("dd", {}, `${p.circle} (version ${p.circle_version})`),
      h("dt", {}, "proposer"), h("dd", {}, h("code", {}, p.proposer)),
      h("dt", {}, "approved"), h("dd", { id: "proposal-weight" }, `${p.approved_weight} of ${p.threshold}`),
      h("dt", {}, "window"), h("dd", {}, `not before ${when(p.not_before)}, expires ${when(p.expires_at)}`),
      h("dt", {}, "digest"), h("dd", {}, h("code", { id: "proposal-digest" }, p.digest)),
      h("dt", {}, "checked"),
      h("dd", { id: "digest-check", class: mismatch ? "failed" : "ok" },
        mismatch
          ? `do not sign: ${mismatch}`
          : "this browser recomputed the digest from the payload below, and it matches")),
    h("h2", {}, "Payload"),
    h("pre", { id: "proposal-payload" }, pretty(p.payload)),
    h("h2", {}, "Signers"),
    table(["identity", "weight", "veto", "decision", "at"], p.signers.map((s) => {
      const d = p.decisions.find((x) => x.identity === s.identity);
      return [h("code", {}, s.identity), s.weight, s.veto ? "yes" : "-", d ? badge(d.decision) : "-", d ? when(d.at) : ""];
    })),
    h("div", { class: "decide" },
      canDecide && session.identity
        ? [
            h("button", { id: "approve", class: "approve", onclick: () => decide(p, digest, "approve") }, "Approve"),
            h("button", { id: "reject", class: "reject", onclick: () => decide(p, digest, "reject") }, "Reject"),
            me && me.veto ? h("button", { id: "veto", class: "reject", onclick: () => decide(p, digest, "veto") }, "Veto") : "",
            me ? "" : h("span", { class: "failed" }, " you are not among this proposal's signers: the server will refuse your decision"),
            mine ? ` you decided: ${mine.decision}` : "",
          ]
        : "",
      h("p", { id: "decision-message" })),
  );
}

export const PAGES = { cluster, nodes, jobs, allocation, models, circles, proposals };
