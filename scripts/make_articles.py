"""Writes examples/data/distillery/articles.jsonl: ~200 short news-style articles for the
oracle-distillation workflow (pipelines/distillery.yaml), in three strata:

- on_topic: people improving things together (community projects, discoveries,
  repairs, rescues, cooperation across groups), which the `uplifting` filter should
  score high;
- off_topic: corporate earnings, match results, celebrity gossip, arms deals and
  product adverts, which it should score low (corporate finance and military items
  carry a content type the filter caps);
- edge: mixed cases (a disaster with volunteers, a company's charity drive, a
  breakthrough with a catch) that a rubric must weigh.

Deterministic (seeded), pure Python, no download. Run from the repository root:
    python3 scripts/make_articles.py
"""
import json
import pathlib
import random

rng = random.Random(20261202)
TOWNS = ["Tarnow", "Ostrava", "Braga", "Tartu", "Kaunas", "Ghent", "Aarhus", "Cluj", "Zadar", "Lund",
         "Pecs", "Turku", "Leiden", "Bergen", "Cork", "Trento", "Graz", "Nantes", "Porto", "Brno"]
SOURCES = ["Daily Ledger", "Regional Wire", "The Courier", "Morning Post", "City Herald", "Evening Star"]
MONTHS = ["2025-01", "2025-03", "2025-04", "2025-06", "2025-08", "2025-09", "2025-11", "2026-02"]

ON = [
    ("Neighbours rebuild {town} footbridge",
     "After floods washed away the old footbridge in {town}, {n} residents spent six weekends rebuilding it with timber donated by a local mill. "
     "Retired engineers checked every joint, teenagers painted the rails, and the school now reports that {k} children walk to class again instead of taking a long bus detour. "
     "Organisers have published their plans so other villages can copy them."),
    ("Volunteers in {town} map every accessible entrance",
     "A group of {n} volunteers in {town} photographed and measured the entrances of shops, clinics and libraries so wheelchair users can plan trips. "
     "The free map already lists {k} places, and three cafes installed ramps after seeing their entry marked as blocked. "
     "Disability groups say the project shows what patient, shared work can change."),
    ("Students in {town} discover a new species of moss",
     "Biology students from {town} surveying old stone walls found a moss that botanists confirmed has never been described. "
     "The class of {n} spent a year collecting samples and sharing them with a university lab, and they will help name it. "
     "Their teacher said the find shows how much wonder remains in places people pass every day."),
    ("{town} repair cafe keeps {k} appliances out of landfill",
     "Every Saturday, volunteers at the repair cafe in {town} fix toasters, lamps and bicycles for free while teaching owners how to do it themselves. "
     "In its first year the cafe repaired {k} items, and {n} regulars now run workshops in nearby towns. "
     "Visitors describe the mood as part classroom, part neighbourhood party."),
    ("Farmers and scientists in {town} restore a wetland",
     "Farmers around {town} agreed with ecologists to let {n} hectares of drained land flood again. "
     "Within two seasons herons, frogs and rare orchids returned, and the restored wetland now protects the village from spring floods. "
     "Both groups meet monthly to decide the next fields to restore."),
    ("{town} nurses train {k} residents in first aid",
     "Nurses from the hospital in {town} gave up evenings to teach first aid in community halls. "
     "{k} residents have finished the course, and last month two of them kept a man alive after a heart attack until the ambulance arrived. "
     "The town plans to offer the course in every school."),
    ("Refugees and locals open a shared kitchen in {town}",
     "A shared kitchen in {town}, run by newly arrived families and long-time residents together, serves {k} meals a week at pay-what-you-can prices. "
     "Recipes from eleven countries rotate on the menu, and {n} volunteers cook side by side. "
     "Organisers say friendships formed at the stove have carried over into jobs and housing help."),
    ("Amateur astronomers in {town} help find an exoplanet",
     "A network of {n} amateur astronomers coordinated from {town} recorded the faint dimming that confirmed a planet orbiting a nearby star. "
     "Professional astronomers credited the volunteers in their paper, and the club now lends telescopes to schools. "
     "Members describe the night of the confirmation as the most exciting of their lives."),
    ("{town} library lends tools, seeds and time",
     "The public library in {town} now lends drills, sewing machines and vegetable seeds alongside books. "
     "Its time bank lets {n} members trade hours of help, from tutoring to fixing roofs, and {k} exchanges were recorded this year. "
     "Librarians say the shelves have become a meeting place for the whole town."),
    ("Clean water project reaches {k} homes near {town}",
     "Engineers and residents near {town} built a gravity-fed water system that now reaches {k} homes that used to carry water from a river. "
     "Villagers dug the trenches, a cooperative maintains the pipes, and child illness from dirty water has fallen sharply, the clinic reports. "
     "Neighbouring villages have asked to join."),
]
OFF = [
    ("corporate_finance", "{company} beats quarterly estimates",
     "{company} reported quarterly revenue of {k} million, ahead of analyst estimates, and raised its full-year guidance. "
     "Shares rose four percent in early trading as margins widened on lower input costs. "
     "The board approved a share buyback and said it would continue to review its portfolio of brands."),
    ("corporate_finance", "{company} completes acquisition of rival",
     "{company} closed its purchase of a smaller competitor for {k} million, creating the second-largest supplier in its segment. "
     "Analysts expect cost savings from merged distribution and some job cuts at overlapping sites. "
     "The deal was financed with new bonds and existing cash."),
    ("sports", "{town} United lose away match",
     "{town} United lost two-nil away on Saturday, their third defeat in a row. "
     "The visitors conceded early from a corner and a late penalty sealed the result. "
     "The manager said the squad must improve its defending before the derby next week; the club sits {k}th in the table."),
    ("celebrity", "Singer's new look stuns fans",
     "The pop singer appeared at an awards party in {town} with a dramatic new haircut and a silver gown, sparking thousands of comments online. "
     "Sources close to the star say a new album is coming this autumn. "
     "Fashion critics were divided on the outfit."),
    ("military_security", "Ministry signs contract for {k} armoured vehicles",
     "The defence ministry signed a contract for {k} armoured vehicles to be delivered over five years. "
     "Officials said the purchase modernises the army's fleet and includes spare parts and training. "
     "The opposition questioned the cost and the choice of supplier."),
    ("advertising", "{company} launches its new smartphone",
     "{company} unveiled its newest smartphone with a brighter screen, a faster chip and three rear cameras. "
     "Pre-orders open on Friday at launch prices from {k} euros, with trade-in discounts for older models. "
     "The company says battery life improves by a fifth."),
    ("corporate_finance", "Bond yields rise as {company} prices debt",
     "Yields on corporate bonds rose after {company} priced {k} million of ten-year notes at a higher coupon than expected. "
     "Traders said demand was steady but investors asked for more compensation amid rate uncertainty. "
     "The company will use the proceeds to refinance existing loans."),
    ("sports", "Cyclist wins stage in sprint finish",
     "The stage race reached {town} where a sprinter edged out two rivals on the final straight after {k} kilometres. "
     "The overall leader finished safely in the bunch and keeps the yellow jersey. "
     "Tomorrow the riders face the first mountain stage."),
]
EDGE = [
    ("disaster", "Storm damages {k} homes in {town}; volunteers clear roads",
     "A violent storm damaged {k} homes in {town} overnight and left two people injured. "
     "By morning {n} volunteers with chainsaws and tractors had cleared the main roads, and a school gym became a shelter. "
     "Officials warned that repairs will take months and insurance claims are piling up."),
    ("corporate_finance", "{company} staff raise funds for children's ward",
     "Employees of {company} raised money for the children's ward in {town} through a sponsored run, and the company matched the total. "
     "The donation will buy two incubators. "
     "The event was announced in the company's quarterly results, alongside a rise in profits of {k} percent."),
    ("science", "Battery breakthrough could cut costs, but years away",
     "Researchers reported a battery chemistry that could store more energy at lower cost, tested in {n} lab cells. "
     "The team cautions that the cells degrade quickly and commercial use is likely a decade away. "
     "Industry partners have not yet committed funding."),
    ("military_security", "Army engineers build temporary bridge after flood",
     "Army engineers built a temporary bridge in {town} within {k} hours after floodwater destroyed the road crossing. "
     "Residents cheered as the first ambulance crossed. "
     "The unit returns to base next week; a permanent bridge is planned for next year."),
    ("politics", "{town} council approves housing plan after heated debate",
     "After a six-hour debate, the council of {town} approved a plan for {k} affordable homes on former industrial land. "
     "Residents' groups that shaped the plan welcomed it, while others protested the loss of a sports field. "
     "Construction is due to start next spring."),
]
COMPANIES = ["Norvex", "Altamira Group", "Kestrel Holdings", "Bluefin Systems", "Orion Retail", "Meridian Foods"]


def article(i, category, content_type, title, body):
    town = rng.choice(TOWNS)
    fill = dict(town=town, n=rng.randint(12, 90), k=rng.randint(3, 400), company=rng.choice(COMPANIES))
    return {
        "id": f"a{i:03d}",
        "category": category,
        "content_type": content_type,
        "title": title.format(**fill),
        "source": rng.choice(SOURCES),
        "date": f"{rng.choice(MONTHS)}-{rng.randint(1, 28):02d}",
        "text": body.format(**fill),
    }


rows = []
for i in range(200):
    if i % 5 in (0, 1):
        t, b = ON[rng.randrange(len(ON))]
        rows.append(article(i, "on_topic", "community", t, b))
    elif i % 5 in (2, 3):
        ct, t, b = OFF[rng.randrange(len(OFF))]
        rows.append(article(i, "off_topic", ct, t, b))
    else:
        ct, t, b = EDGE[rng.randrange(len(EDGE))]
        rows.append(article(i, "edge", ct, t, b))

out = pathlib.Path(__file__).resolve().parents[1] / "examples/data/distillery/articles.jsonl"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
counts = {}
for r in rows:
    counts[r["category"]] = counts.get(r["category"], 0) + 1
print("wrote", out, len(rows), counts)
