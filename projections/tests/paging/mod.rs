//! Shared by the read-model suites: a whole export, page by page.

use serde_json::Value;
use tektree_projections::{ReadModel, ReadModelStore};

/// Every row of `model`, read in pages of `page`, each page after the previous one's cursor;
/// checks that a page is never longer than asked, that a cursor comes exactly with a full
/// page, and that it belongs to `model`.
pub async fn export_in_pages(
    store: &dyn ReadModelStore,
    model: ReadModel,
    page: u32,
) -> Vec<Value> {
    let mut rows = vec![];
    let mut after = None;
    loop {
        let got = store.export(model, after.as_ref(), page).await.unwrap();
        assert!(got.rows.len() <= page as usize);
        assert_eq!(
            got.next.is_some(),
            got.rows.len() == page as usize,
            "a cursor exactly when the page is full"
        );
        rows.extend(got.rows);
        match got.next {
            Some(cursor) => {
                assert_eq!(cursor.model(), model);
                after = Some(cursor);
            }
            None => return rows,
        }
    }
}
