//! Builders for the values every MongoDB adapter of the workspace writes: index specifications
//! and UUIDs.

use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, Document};
use mongodb::options::IndexOptions;
use mongodb::IndexModel;
use uuid::Uuid;

/// An index on `keys` named `name`, unique if `unique`, partial on `partial` if given (the
/// builder every adapter of the workspace uses for its index specifications).
pub fn index_model(
    keys: Document,
    name: &str,
    unique: bool,
    partial: Option<Document>,
) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(
            IndexOptions::builder()
                .name(name.to_string())
                .unique(unique.then_some(true))
                .partial_filter_expression(partial)
                .build(),
        )
        .build()
}

/// A UUID as BSON binary subtype 4 (standard UUID representation).
pub fn uuid_to_bson(id: Uuid) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Uuid,
        bytes: id.as_bytes().to_vec(),
    })
}
