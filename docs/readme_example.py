import trio

import poc_api
from poc_api.testing import open_client, reference_server


async def main() -> None:
    async with reference_server() as server, open_client(server) as client:
        prompt = await client.tokenize("Once upon a time")
        async with client.session() as session:
            await session.prefill(prompt)
            sampling = poc_api.SamplingParams(max_tokens=24)  # greedy
            async with session.generate(sampling=sampling) as events:
                ids = [ev.id async for ev in events if isinstance(ev, poc_api.Token)]
        print("completion:", await client.detokenize(ids))

        for text in (" there was", " zqx"):
            cont = await client.tokenize(text)
            chunks = [poc_api.Tokens(prompt + cont)]
            [result] = await client.score(chunks, [(len(prompt), len(prompt) + len(cont))])
            print(f"log P({text!r} | prompt) = {result.logprob:.2f}")


trio.run(main)
