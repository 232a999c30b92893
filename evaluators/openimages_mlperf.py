"""The OpenImages-MLPerf label space (264 classes; label i = category id i in openimages-mlperf.json, as MLPerf's
dataset script writes it) and a converter from COCO ground truth, so the RetinaNet flow can run on COCO images."""
from __future__ import annotations

# MLCommons training `single_stage_detector/scripts/download_openimages_mlperf.sh`, in label order
CLASSES = (
    'Airplane', 'Antelope', 'Apple', 'Backpack', 'Balloon', 'Banana', 'Barrel', 'Baseball bat', 'Baseball glove',
    'Bee', 'Beer', 'Bench', 'Bicycle', 'Bicycle helmet', 'Bicycle wheel', 'Billboard', 'Book', 'Bookcase', 'Boot',
    'Bottle', 'Bowl', 'Bowling equipment', 'Box', 'Boy', 'Brassiere', 'Bread', 'Broccoli', 'Bronze sculpture',
    'Bull', 'Bus', 'Bust', 'Butterfly', 'Cabinetry', 'Cake', 'Camel', 'Camera', 'Candle', 'Candy', 'Cannon',
    'Canoe', 'Carrot', 'Cart', 'Castle', 'Cat', 'Cattle', 'Cello', 'Chair', 'Cheese', 'Chest of drawers',
    'Chicken', 'Christmas tree', 'Coat', 'Cocktail', 'Coffee', 'Coffee cup', 'Coffee table', 'Coin',
    'Common sunflower', 'Computer keyboard', 'Computer monitor', 'Convenience store', 'Cookie', 'Countertop',
    'Cowboy hat', 'Crab', 'Crocodile', 'Cucumber', 'Cupboard', 'Curtain', 'Deer', 'Desk', 'Dinosaur', 'Dog',
    'Doll', 'Dolphin', 'Door', 'Dragonfly', 'Drawer', 'Dress', 'Drum', 'Duck', 'Eagle', 'Earrings', 'Egg (Food)',
    'Elephant', 'Falcon', 'Fedora', 'Flag', 'Flowerpot', 'Football', 'Football helmet', 'Fork', 'Fountain',
    'French fries', 'French horn', 'Frog', 'Giraffe', 'Girl', 'Glasses', 'Goat', 'Goggles', 'Goldfish', 'Gondola',
    'Goose', 'Grape', 'Grapefruit', 'Guitar', 'Hamburger', 'Handbag', 'Harbor seal', 'Headphones', 'Helicopter',
    'High heels', 'Hiking equipment', 'Horse', 'House', 'Houseplant', 'Human arm', 'Human beard', 'Human body',
    'Human ear', 'Human eye', 'Human face', 'Human foot', 'Human hair', 'Human hand', 'Human head', 'Human leg',
    'Human mouth', 'Human nose', 'Ice cream', 'Jacket', 'Jeans', 'Jellyfish', 'Juice', 'Kitchen & dining room table',
    'Kite', 'Lamp', 'Lantern', 'Laptop', 'Lavender (Plant)', 'Lemon', 'Light bulb', 'Lighthouse', 'Lily', 'Lion',
    'Lipstick', 'Lizard', 'Man', 'Maple', 'Microphone', 'Mirror', 'Mixing bowl', 'Mobile phone', 'Monkey',
    'Motorcycle', 'Muffin', 'Mug', 'Mule', 'Mushroom', 'Musical keyboard', 'Necklace', 'Nightstand',
    'Office building', 'Orange', 'Owl', 'Oyster', 'Paddle', 'Palm tree', 'Parachute', 'Parrot', 'Pen', 'Penguin',
    'Personal flotation device', 'Piano', 'Picture frame', 'Pig', 'Pillow', 'Pizza', 'Plate', 'Platter', 'Porch',
    'Poster', 'Pumpkin', 'Rabbit', 'Rifle', 'Roller skates', 'Rose', 'Salad', 'Sandal', 'Saucer', 'Saxophone',
    'Scarf', 'Sea lion', 'Sea turtle', 'Sheep', 'Shelf', 'Shirt', 'Shorts', 'Shrimp', 'Sink', 'Skateboard', 'Ski',
    'Skull', 'Skyscraper', 'Snake', 'Sock', 'Sofa bed', 'Sparrow', 'Spider', 'Spoon', 'Sports uniform', 'Squirrel',
    'Stairs', 'Stool', 'Strawberry', 'Street light', 'Studio couch', 'Suit', 'Sun hat', 'Sunglasses', 'Surfboard',
    'Sushi', 'Swan', 'Swimming pool', 'Swimwear', 'Tank', 'Tap', 'Taxi', 'Tea', 'Teddy bear', 'Television', 'Tent',
    'Tie', 'Tiger', 'Tin can', 'Tire', 'Toilet', 'Tomato', 'Tortoise', 'Tower', 'Traffic light', 'Train', 'Tripod',
    'Truck', 'Trumpet', 'Umbrella', 'Van', 'Vase', 'Vehicle registration plate', 'Violin', 'Wall clock',
    'Waste container', 'Watch', 'Whale', 'Wheel', 'Wheelchair', 'Whiteboard', 'Window', 'Wine', 'Wine glass',
    'Woman', 'Zebra', 'Zucchini')

# COCO classes whose MLPerf counterpart has another name; the others that exist in both match by capitalization.
# COCO classes with no single counterpart (person, car, bird, cup, couch, sports ball, …) are dropped.
RENAMED = {'cow': 'Cattle', 'cell phone': 'Mobile phone', 'tv': 'Television', 'potted plant': 'Houseplant',
           'dining table': 'Kitchen & dining room table', 'keyboard': 'Computer keyboard', 'skis': 'Ski'}


def coco_to_mlperf(coco_name: str) -> str | None:
    """The MLPerf class for a COCO class name, or None when there is none."""
    name = RENAMED.get(coco_name, coco_name[:1].upper() + coco_name[1:])
    return name if name in CLASSES else None


def convert(coco: dict) -> dict:
    """An openimages-mlperf-format dict (264 categories, ids 0..263 = labels) from a COCO ground-truth dict:
    annotations of the shared classes, with their category re-numbered; every image kept."""
    mapping = {c['id']: coco_to_mlperf(c['name']) for c in coco['categories']}
    label = {name: i for i, name in enumerate(CLASSES)}
    annotations = [{**a, 'category_id': label[mapping[a['category_id']]]} for a in coco['annotations']
                   if mapping.get(a['category_id'])]
    return {'info': {'description': 'COCO ground truth in the OpenImages-MLPerf label space (inloop)'},
            'images': coco['images'], 'annotations': annotations,
            'categories': [{'id': i, 'name': name} for i, name in enumerate(CLASSES)]}
