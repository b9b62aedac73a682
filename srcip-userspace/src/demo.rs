pub async fn demo() -> anyhow::Result<()> {
    todo!()
}
