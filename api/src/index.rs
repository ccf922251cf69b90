//! What `GET /api/v1` answers: where the document is and, by area, the routes it
//! describes, so a client (or a person with curl) can find its way without reading
//! the whole OpenAPI document.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The index of the control API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiIndex {
    /// The API's title.
    pub title: String,
    /// The version of the server answering.
    pub version: String,
    /// Where the OpenAPI 3.1 document is served.
    pub openapi: String,
    /// The areas of the API, in the document's order.
    pub areas: Vec<ApiArea>,
}

/// One area of the API (`jobs`, `nodes`, `models`, ...), as the document tags it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiArea {
    /// The area's tag in the OpenAPI document.
    pub name: String,
    /// What the area is for.
    pub description: String,
    /// Its routes, as `METHOD path`.
    pub routes: Vec<String>,
}
