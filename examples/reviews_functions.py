def preprocess(row):
    return {
        "review": row["text"],
        "messages": [{"role": "user", "content": f"Summarize: {row['text']}"}],
        "sampling_params": {"max_tokens": 128, "temperature": 0.2},
    }


def postprocess(row):
    return {"review": row["review"], "summary": row["generated_text"]}
