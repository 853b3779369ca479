"""A site's training script for the mTLS federation test (NVFlare Client API, NumPy).

Each round the site returns the global weights + 1, so after R rounds of FedAvg the
server's global model is the initial weights + R: the test can check the arithmetic
of real aggregation over real mTLS links, not just that a job ended.
"""

import numpy as np

import nvflare.client as flare


def main():
    flare.init()
    site = flare.get_site_name()
    while flare.is_running():
        global_model = flare.receive()
        params = {k: np.asarray(v) + 1.0 for k, v in global_model.params.items()}
        print(f"{site}: round {global_model.current_round} trained", flush=True)
        flare.send(flare.FLModel(params=params, metrics={"accuracy": 1.0}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))


if __name__ == "__main__":
    main()
